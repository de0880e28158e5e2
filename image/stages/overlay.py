"""Stage 2: the overlay tree — `overlay/` rendered (`*.j2`, Jinja2) or copied, modes kept.

Templates see the whole image definition (`{{ hostname }}`, `{{ network.dhcp_timeout }}`,
`{{ client.venv }}`, `{{ iso.volume_label }}`...). Undefined values are errors that name the
template, its line and the full dotted name of the missing variable.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import jinja2

from image.core.errors import ImageError
from image.core.paths import REPO, code_digest, digest, tree_digest
from image.stages.config import ImageConfig

CODE = ("image/stages/overlay.py",)  # this stage's code: editing it changes the key
TEMPLATE_SUFFIX = ".j2"


class RenderError(ImageError, ValueError):
    """A template could not be rendered; the message names the template and what is wrong."""


class _Scope(dict):
    """A mapping of template values that remembers its dotted name, for error messages."""

    def __init__(self, values: dict[str, Any], keypath: str) -> None:
        super().__init__(values)
        self._keypath = keypath


def _scoped(value: Any, keypath: str) -> Any:
    if isinstance(value, dict):
        return _Scope({k: _scoped(v, f"{keypath}.{k}" if keypath else k) for k, v in value.items()}, keypath)
    if isinstance(value, list):
        return [_scoped(v, f"{keypath}[{i}]") for i, v in enumerate(value)]
    return value


class _NamedStrictUndefined(jinja2.StrictUndefined):
    """StrictUndefined whose message is the full dotted variable name (`network.dhcp_timout`)."""

    @property
    def _undefined_message(self) -> str:
        parent = getattr(self._undefined_obj, "_keypath", None)
        if parent and self._undefined_name is not None:
            return f"undefined variable '{parent}.{self._undefined_name}'"
        if self._undefined_obj is jinja2.utils.missing and self._undefined_name is not None:
            return f"undefined variable '{self._undefined_name}'"
        return "undefined value: " + super()._undefined_message


def _template_line(exc: BaseException, template: str) -> int | None:
    """The template line of the failing expression (Jinja rewrites tracebacks to template lines)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(template):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def make_environment(source: Path) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(source)),
        undefined=_NamedStrictUndefined,
        keep_trailing_newline=True,  # config files end with a newline, as written
        autoescape=False,  # shell scripts and unit files, not HTML
    )


def render_template(env: jinja2.Environment, rel: str, values: dict[str, Any]) -> str:
    try:
        return env.get_template(rel).render(_scoped(values, ""))
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"overlay/{rel}:{exc.lineno}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        line = _template_line(exc, rel)
        where = f"overlay/{rel}" + (f":{line}" if line else "")
        raise RenderError(f"{where}: {exc.message} (add it to the image definition or fix the template)") from None


def _copy_mode(src: Path, dst: Path) -> None:
    os.chmod(dst, stat.S_IMODE(src.lstat().st_mode))


def render_overlay(source: Path, dest: Path, values: dict[str, Any]) -> list[Path]:
    """Render/copy `source` into a fresh `dest`; returns the relative paths written.

    Symlinks are copied as symlinks, directories and files keep their permission bits and,
    when we are root, everything is owned by root (the checkout's owner must not leak in).
    """
    if not source.is_dir():
        raise RenderError(f"{source}: the overlay directory does not exist")
    env = make_environment(source)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written: list[Path] = []
    as_root = os.geteuid() == 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        src_dir = Path(dirpath)
        rel_dir = src_dir.relative_to(source)
        out_dir = tmp / rel_dir
        out_dir.mkdir(exist_ok=True)
        for name in sorted(filenames) + [d for d in dirnames if (src_dir / d).is_symlink()]:
            src = src_dir / name
            rel = rel_dir / name
            if src.is_symlink():
                (out_dir / name).symlink_to(os.readlink(src))
                out = out_dir / name
            elif name.endswith(TEMPLATE_SUFFIX):
                out_name = name[: -len(TEMPLATE_SUFFIX)]
                if (src_dir / out_name).exists():
                    raise RenderError(f"overlay/{rel}: both {name} and {out_name} exist; keep one")
                out = out_dir / out_name
                out.write_text(render_template(env, rel.as_posix(), values))
                _copy_mode(src, out)
                rel = rel_dir / out_name
            else:
                out = out_dir / name
                shutil.copyfile(src, out)
                _copy_mode(src, out)
            if as_root:
                os.lchown(out, 0, 0)
            written.append(rel)
        # os.walk does not descend into directory symlinks; they were copied as links above.
        dirnames[:] = [d for d in dirnames if not (src_dir / d).is_symlink()]
    for dirpath, _, _ in os.walk(tmp):
        d = Path(dirpath)
        src_d = source / d.relative_to(tmp)
        _copy_mode(src_d, d)
        if as_root:
            os.lchown(d, 0, 0)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return written


def overlay_key(cfg: ImageConfig, source: Path, repo: Path = REPO) -> str:
    return digest("overlay", code_digest(*CODE, repo=repo), tree_digest(source), cfg.template_vars())
