"""The incremental build: image definition -> rootfs -> overlay -> client -> squashfs -> bootloader -> iso -> hashes.

Each stage computes a key over its inputs and skips its work when the key matches the stamp of
its last successful run (build/cache/stamps/<stage>.key) and its products exist. Every key holds
the digest of its stage's own code (each stage module's CODE and the image modules it imports, shared
code such as config, templating and core included: image.core.paths.code_digest), so editing a stage
or what it uses rebuilds it and the stages that use its products. Asking for a stage brings the
stages before it up to date first.

Only rootfs and bootloader reach the Debian mirror: bootloader fetches the signed shim/GRUB/MokManager
into the cache with a manifest (package, version, arch, sha256 of each file), and the ISO stage
assembles local files, its key holding that manifest.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from image.core.errors import ImageError
from image.core.paths import DEFAULT_BUILD, REPO, BuildPaths, code_digest, digest
from image.stages import bootloader, clientenv, hashes, overlay, rootfs, squashfs
from image.stages.boot import iso
from image.stages.config import ImageConfig, load_config, resolve_base_epoch, resolve_source_date_epoch
from image.stages.hashes import sha512_file, write_hashes

log = logging.getLogger("image.stages.pipeline")

STAGES = ("rootfs", "overlay", "client", "squashfs", "bootloader", "iso", "hashes")
# The ISO's inputs are put together here (run_iso): this module is part of the ISO stage's code.
PIPELINE_CODE = ("image/stages/pipeline.py",)


class BuildError(ImageError, RuntimeError):
    """A stage cannot run (missing input or prerequisite); the message says what to do."""


@dataclass
class StageResult:
    stage: str
    skipped: bool
    seconds: float
    detail: str = ""


@dataclass
class BuildReport:
    results: list[StageResult] = field(default_factory=list)

    def add(self, result: StageResult) -> None:
        self.results.append(result)

    def format(self) -> str:
        lines = []
        for r in self.results:
            state = "up to date" if r.skipped else f"built in {r.seconds:6.1f} s"
            lines.append(f"  {r.stage:<16} {state}" + (f"  {r.detail}" if r.detail else ""))
        total = sum(r.seconds for r in self.results)
        lines.append(f"  {'total':<16} {total:6.1f} s")
        return "\n".join(lines)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


class Pipeline:
    """One build directory's stages. Keys are computed lazily and at most once per instance."""

    def __init__(
        self, cfg: ImageConfig, paths: BuildPaths, repo: Path = REPO, epochs: tuple[int, int] | None = None
    ) -> None:
        """`epochs` = (base, other) pins the SOURCE_DATE_EPOCHs instead of asking git, so two builds
        compared with each other cannot disagree because a commit landed in between."""
        self.cfg = cfg
        self.paths = paths
        self.repo = repo
        self.report = BuildReport()
        self._done: set[str] = set()
        if epochs is not None:
            self.base_epoch, self.epoch = epochs

    @classmethod
    def from_files(cls, config: Path | None = None, build_dir: Path | None = None) -> Pipeline:
        return cls(load_config(config) if config else load_config(), BuildPaths(build_dir or DEFAULT_BUILD))

    # --- epochs and keys --------------------------------------------------------------------

    @cached_property
    def base_epoch(self) -> int:
        return resolve_base_epoch(self.cfg, self.repo)

    @cached_property
    def epoch(self) -> int:
        return resolve_source_date_epoch(self.cfg, self.repo)

    @cached_property
    def rootfs_key(self) -> str:
        return rootfs.rootfs_key(self.cfg, self.base_epoch, rootfs.mmdebstrap_version(), self.repo)

    @cached_property
    def overlay_key(self) -> str:
        return overlay.overlay_key(self.cfg, self.repo / "overlay", self.repo)

    @cached_property
    def client_key(self) -> str:
        return clientenv.client_key(
            self.rootfs_key,
            self.cfg.client.venv,
            self.epoch,
            lock=self.repo / "client" / "requirements.lock",
            src=self.repo / "client",
            repo=self.repo,
        )

    @cached_property
    def _mksquashfs_version(self) -> str:
        return squashfs.mksquashfs_version()

    @cached_property
    def base_layer_key(self) -> str:
        return squashfs.base_layer_key(self.rootfs_key, self.cfg.squashfs, self._mksquashfs_version, self.repo)

    @cached_property
    def deps_key(self) -> str:
        return clientenv.deps_key(
            self.rootfs_key, self.cfg.client.venv, self.repo / "client" / "requirements.lock", self.repo
        )

    @cached_property
    def deps_layer_key(self) -> str:
        return squashfs.deps_layer_key(
            self.deps_key, self.cfg.squashfs, self.base_epoch, self._mksquashfs_version, self.repo
        )

    @cached_property
    def overlay_layer_key(self) -> str:
        return squashfs.overlay_layer_key(
            self.overlay_key, self.client_key, self.cfg.squashfs, self.epoch, self._mksquashfs_version, self.repo
        )

    @cached_property
    def apt_sources(self) -> bootloader.AptSources:
        return bootloader.AptSources.from_config(self.cfg)

    @cached_property
    def boot_loader_candidates(self) -> dict[str, str | None]:
        # The versions apt sees now (lists refreshed at most daily): a new shim or GRUB is fetched.
        return bootloader.resolve_candidates(self.apt_sources, self.paths.cache)

    @cached_property
    def bootloader_key(self) -> str:
        return bootloader.bootloader_key(self.apt_sources, self.boot_loader_candidates, self.repo)

    def _boot_loader_manifest_digest(self) -> str:
        """What the bootloader stage fetched (its manifest), not its key: a refetch of the same
        packages leaves the ISO alone. Read after that stage ran (run_iso runs it first)."""
        try:
            return digest(self.paths.boot_loader_manifest.read_text())
        except FileNotFoundError:
            return ""

    @cached_property
    def iso_key(self) -> str:
        return digest(
            "iso",
            code_digest(*iso.CODE, *PIPELINE_CODE, repo=self.repo),
            self.base_layer_key,
            self.deps_layer_key,
            self.overlay_layer_key,
            self.rootfs_key,
            self._boot_loader_manifest_digest(),
            self.epoch,
            self.cfg.template_vars(),
        )

    @cached_property
    def hashes_key(self) -> str:
        return digest("hashes", code_digest(*hashes.CODE, repo=self.repo), self.iso_key)

    @property
    def artifact(self) -> Path:
        return self.paths.artifact(self.cfg.iso.artifact)

    # --- running stages ---------------------------------------------------------------------

    def _stage(
        self, name: str, key: str, products: list[Path], work: Callable[[], str | None], force: bool = False
    ) -> None:
        if name in self._done:
            return
        self._done.add(name)
        if not force and self.paths.is_fresh(name, key) and all(p.exists() for p in products):
            log.info("==> %s: up to date", name)
            self.report.add(StageResult(name, True, 0.0))
            return
        log.info("==> %s: building...", name)
        self.paths.invalidate(name)
        start = time.monotonic()
        detail = work() or ""
        seconds = time.monotonic() - start
        self.paths.mark_done(name, key)
        log.info("==> %s: done in %.1f s %s", name, seconds, detail)
        self.report.add(StageResult(name, False, seconds, detail))

    def run_rootfs(self, force: bool = False) -> None:
        p = self.paths

        def work() -> str:
            rootfs.build_rootfs(self.cfg, p, self.base_epoch)
            n = len(p.manifest.read_text().splitlines())
            return f"{n} packages, kernel {(p.kernel.parent / 'kernel-version').read_text().strip()}"

        self._stage("rootfs", self.rootfs_key, [p.rootfs, p.manifest, p.kernel, p.initrd], work, force)

    def run_overlay(self, force: bool = False) -> None:
        def work() -> str:
            written = overlay.render_overlay(self.repo / "overlay", self.paths.overlay, self.cfg.template_vars())
            return f"{len(written)} files"

        self._stage("overlay", self.overlay_key, [self.paths.overlay], work, force)

    def run_client(self, force: bool = False) -> None:
        self.run_rootfs()
        p = self.paths

        venv = self.cfg.client.venv.lstrip("/")

        def work() -> str:
            n = clientenv.build_client(
                p,
                self.rootfs_key,
                self.cfg.client.venv,
                self.epoch,
                deps_epoch=self.base_epoch,
                lock=self.repo / "client" / "requirements.lock",
                src=self.repo / "client",
            )
            return f"{n} client files"

        self._stage("client", self.client_key, [p.client / venv, p.client_deps / venv], work, force)

    def run_squashfs(self, force: bool = False) -> None:
        self.run_rootfs()
        self.run_overlay()
        self.run_client()
        p = self.paths

        def base() -> str:
            squashfs.build_base_layer(p.rootfs, p.base_layer, self.cfg.squashfs, self.epoch_for_base)
            return _mib(p.base_layer)

        def deps() -> str:
            squashfs.build_deps_layer(p.client_deps, p.deps_layer, self.cfg.squashfs, self.base_epoch)
            return _mib(p.deps_layer)

        def top() -> str:
            squashfs.build_overlay_layer(p.overlay, p.client, p.overlay_layer, self.cfg.squashfs, self.epoch)
            squashfs.write_module_file(p.module_file, list(self.layers))
            return _mib(p.overlay_layer)

        self._stage("squashfs-base", self.base_layer_key, [p.base_layer], base, force)
        self._stage("squashfs-deps", self.deps_layer_key, [p.deps_layer], deps, force)
        self._stage("squashfs-overlay", self.overlay_layer_key, [p.overlay_layer, p.module_file], top, force)

    @property
    def layers(self) -> tuple[Path, ...]:
        """The squashfs layers in stacking order (lowest first)."""
        return (self.paths.base_layer, self.paths.deps_layer, self.paths.overlay_layer)

    @property
    def epoch_for_base(self) -> int:
        # The base layer's timestamps follow the base's own epoch, so a commit elsewhere does not
        # change (and rebuild) the big layer.
        return self.base_epoch

    def run_bootloader(self, force: bool = False) -> None:
        p = self.paths

        def work() -> str:
            loaders = bootloader.build_bootloader(p, self.apt_sources, self.boot_loader_candidates)
            return ", ".join(f"{k} {v}" for k, v in loaders.versions.items())

        # The unpacked files count as products too: a cleaned cache/efi/ is fetched again.
        products = [p.boot_loader_manifest, p.boot_loader_packages]
        products += bootloader.manifest_files(p.boot_loader_manifest, p.cache)
        self._stage("bootloader", self.bootloader_key, products, work, force)

    def run_iso(self, force: bool = False) -> None:
        self.run_squashfs()
        self.run_bootloader()
        p = self.paths
        out_manifest = p.out_manifest(self.cfg.iso.artifact)
        out_loaders = p.out_boot_loader_packages(self.cfg.iso.artifact)

        def work() -> str:
            loaders = bootloader.load_boot_loaders(p.boot_loader_manifest, p.cache)
            inputs = iso.IsoInputs(
                kernel=p.kernel,
                initrd=p.initrd,
                layers=self.layers,
                extra_files={
                    "/live/filesystem.module": p.module_file,
                    # The live system's packages (the rootfs's) and, apart, the boot loaders on the medium.
                    "/live/filesystem.packages": p.manifest,
                    "/live/bootloader.packages": p.boot_loader_packages,
                },
                source_date_epoch=self.epoch,
            )
            p.out.mkdir(parents=True, exist_ok=True)
            iso.assemble_iso(self.cfg, inputs, self.artifact, p.cache, loaders)
            shutil.copyfile(p.manifest, out_manifest)
            shutil.copyfile(p.boot_loader_packages, out_loaders)
            return _mib(self.artifact)

        self._stage("iso", self.iso_key, [self.artifact, out_manifest, out_loaders], work, force)

    def run_hashes(self, force: bool = False) -> None:
        self.run_iso()
        sha = self.artifact.with_name(self.artifact.name + ".sha512")
        sums = self.artifact.with_name("SHA512SUMS")

        def work() -> str:
            write_hashes(self.artifact)
            return sha.read_text().strip()[:16] + "..."

        self._stage("hashes", self.hashes_key, [sha, sums], work, force)

    def build(self, until: str = "hashes", force: str | None = None) -> BuildReport:
        """Bring every stage up to `until` up to date; `force` rebuilds that one stage."""
        runners: dict[str, Callable[..., None]] = {
            "rootfs": self.run_rootfs,
            "overlay": self.run_overlay,
            "client": self.run_client,
            "squashfs": self.run_squashfs,
            "bootloader": self.run_bootloader,
            "iso": self.run_iso,
            "hashes": self.run_hashes,
        }
        if until not in runners:
            raise BuildError(f"unknown stage {until!r} (stages: {', '.join(STAGES)})")
        if force:
            if force not in runners:
                raise BuildError(f"unknown stage {force!r} (stages: {', '.join(STAGES)})")
            runners[force](force=True)
        runners[until]()
        return self.report

    def layer_sizes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.layers if p.exists()}


# --- reproducibility -------------------------------------------------------------------------


class ReproducibilityError(ImageError, RuntimeError):
    """Two builds from the same inputs differ; the message names the differing files."""


def compared_files(pipe: Pipeline) -> dict[str, Path]:
    p = pipe.paths
    return {
        f"out/{pipe.cfg.iso.artifact}": pipe.artifact,
        f"out/{p.out_manifest(pipe.cfg.iso.artifact).name}": p.out_manifest(pipe.cfg.iso.artifact),
        f"out/{p.out_boot_loader_packages(pipe.cfg.iso.artifact).name}": p.out_boot_loader_packages(
            pipe.cfg.iso.artifact
        ),
        f"layers/{p.base_layer.name}": p.base_layer,
        f"layers/{p.deps_layer.name}": p.deps_layer,
        f"layers/{p.overlay_layer.name}": p.overlay_layer,
        f"layers/{p.module_file.name}": p.module_file,
        "boot/vmlinuz": p.kernel,
        "boot/initrd.img": p.initrd,
    }


def compare_builds(a: Pipeline, b: Pipeline) -> dict[str, str]:
    """sha512 of every compared file; raises ReproducibilityError naming the ones that differ."""
    fa, fb = compared_files(a), compared_files(b)
    sums: dict[str, str] = {}
    differing = []
    for name in fa:
        ha, hb = sha512_file(fa[name]), sha512_file(fb[name])
        sums[name] = ha
        if ha != hb:
            differing.append(f"{name}: {fa[name]} sha512 {ha[:16]}... != {fb[name]} sha512 {hb[:16]}...")
    if differing:
        raise ReproducibilityError("builds differ:\n  " + "\n  ".join(differing))
    return sums


def reproduce(config: Path | None = None, build_dir: Path | None = None) -> dict[str, str]:
    """Build everything twice from cold in <build>/repro-a and <build>/repro-b (separate caches,
    shared downloads) and compare. Returns the common sha512 of each compared file."""
    root = build_dir or DEFAULT_BUILD
    cfg = load_config(config) if config else load_config()
    first = Pipeline(cfg, BuildPaths(root / "repro-a"))
    epochs = (first.base_epoch, first.epoch)
    pipes = []
    for name in ("repro-a", "repro-b"):
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        log.info("reproduce: cold build in %s", d)
        pipe = Pipeline(cfg, BuildPaths(d, downloads=root / "cache"), epochs=epochs)
        pipe.build()
        log.info("reproduce: %s:\n%s", name, pipe.report.format())
        pipes.append(pipe)
    return compare_builds(pipes[0], pipes[1])


def clean(build_dir: Path | None = None, everything: bool = False) -> list[Path]:
    """Remove build/out (and with everything=True the caches and repro builds too)."""
    root = build_dir or DEFAULT_BUILD
    targets = [root / "out"]
    if everything:
        targets += [root / "cache", root / "repro-a", root / "repro-b", root / "measure"]
    removed = []
    for t in targets:
        if t.exists():
            shutil.rmtree(t)
            removed.append(t)
    return removed
