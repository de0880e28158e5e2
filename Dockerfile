# Builds the failback LiveCD in a container, with the same script and the same result as on a
# Debian 12 host:
#
#   docker build -t failback-livecd .
#   docker run --privileged -v "$PWD/build:/src/build" failback-livecd
#
# The ISO lands in ./build/out/ (caches in ./build/cache/, so a second run is incremental).
# --privileged: mmdebstrap mounts /proc, /sys and /dev inside the rootfs it builds.
# Other tasks run the same way, e.g. `docker run --privileged ... failback-livecd smoke`.
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The whole repository (see .dockerignore), .git included: the build dates its output by the
# last commit (source_date_epoch: git).
COPY . /src
# The one script that installs every system and Python package (README and CI use it too).
RUN ./install-deps.sh && rm -rf /var/lib/apt/lists/* /root/.cache

VOLUME ["/src/build"]
ENTRYPOINT [".venv/bin/inv"]
CMD ["build"]
