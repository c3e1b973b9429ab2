"""``instantid cluster render``: keep cluster/rayservice.yaml's ``serveConfigV2`` equal to production.yaml.

The production Serve config is the single source of truth; the RayService manifest embeds a copy because KubeRay
only reads ``spec.serveConfigV2`` as a string. Rendering copies the file verbatim (its comments document the
node pools) under a "generated" header and swaps only that one block scalar in the manifest, so the rest of the
hand-written manifest, comments included, is never re-serialised. ``--check`` is what CI and the tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

PACKAGED_CONFIG = ("configs", "production.yaml")
# Constant on purpose: --check compares content, so the header must not depend on where the config was read from.
GENERATED_HEADER = (
    "# GENERATED from serve/configs/production.yaml by `instantid cluster render`: edit that file, not this block."
)
DEFAULT_MANIFEST = Path("cluster") / "rayservice.yaml"
_KEY = "serveConfigV2"
# The key line, at any indentation, followed by a block scalar, a quoted/plain scalar, or nothing.
_KEY_LINE = re.compile(rf"^(?P<indent>[ ]*){_KEY}:(?P<rest>.*)$")


class RenderError(Exception):
    """The config or the manifest cannot be rendered (missing, invalid, or without a serveConfigV2 key)."""


def repo_root() -> Path:
    """The checkout that holds the ``serve`` package: ``cluster/`` lives beside it."""
    return Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _packaged_config() -> Iterator[Path]:
    resource = importlib.resources.files("serve").joinpath(*PACKAGED_CONFIG)
    with importlib.resources.as_file(resource) as path:
        yield Path(path)


def render_serve_config_v2(config_path: Path | str) -> str:
    """The ``serveConfigV2`` text for ``config_path``: validated, copied verbatim, under a generated header.

    Validation (Ray's ServeDeploySchema + our AppConfig, via ServeFile.load) runs first so that an invalid
    production config can never reach the manifest.
    """
    from serve.tools.runner import ServeFile

    path = Path(config_path)
    try:
        ServeFile.load(path)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        raise RenderError(f"{path} is not a valid Serve config: {exc}") from exc
    # Trailing spaces cannot survive a literal block scalar reliably: drop them so render is a fixed point.
    body = "\n".join(line.rstrip() for line in path.read_text(encoding="utf-8").splitlines()).strip("\n")
    return GENERATED_HEADER + "\n" + body + "\n"


def _block_scalar(text: str, indent: str) -> list[str]:
    """``text`` as the lines of a literal block scalar body indented by ``indent``."""
    return [(indent + line) if line.strip() else "" for line in text.splitlines()]


def replace_serve_config(manifest: str, rendered: str) -> str:
    """``manifest`` with the value of its single ``serveConfigV2`` key replaced by ``rendered``.

    Textual on purpose (a YAML round trip would drop every comment and reflow the manifest). The old value is
    the key line plus every following line that is blank or indented deeper than the key. The result is parsed
    back and must give exactly ``rendered``, so a surprising layout fails loudly instead of writing garbage.
    """
    lines = manifest.splitlines()
    hits = [i for i, line in enumerate(lines) if _KEY_LINE.match(line)]
    if len(hits) != 1:
        raise RenderError(f"expected exactly one `{_KEY}:` line in the manifest, found {len(hits)}")
    start = hits[0]
    indent = _KEY_LINE.match(lines[start]).group("indent")  # type: ignore[union-attr]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > len(indent)):
        end += 1
    # Blank lines just before the next key separate sections: keep them outside the block.
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    body_indent = indent + "  "
    body = _block_scalar(rendered, body_indent)
    first = next((line for line in rendered.splitlines() if line.strip()), "")
    indicator = "|" if not first.startswith(" ") else "|2"  # a leading space needs an explicit indentation
    new_lines = [*lines[:start], f"{indent}{_KEY}: {indicator}", *body, *lines[end:]]
    result = "\n".join(new_lines) + "\n"
    if _serve_config_of(result) != rendered:
        raise RenderError(f"could not rewrite `{_KEY}` in place (unexpected manifest layout)")
    return result


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _serve_config_of(manifest: str) -> str | None:
    """``spec.serveConfigV2`` of the first document of ``manifest`` (None when absent)."""
    try:
        doc = next(iter(yaml.safe_load_all(manifest)), None)
    except yaml.YAMLError as exc:
        raise RenderError(f"the manifest is not valid YAML: {exc}") from exc
    spec = (doc or {}).get("spec") if isinstance(doc, dict) else None
    value = spec.get(_KEY) if isinstance(spec, dict) else None
    return value if isinstance(value, str) else None


def render_main(args: argparse.Namespace) -> int:
    """Write (or with ``check`` compare) the manifest's serveConfigV2. 0: ok, 1: out of date, 2: error."""
    out = Path(args.out) if getattr(args, "out", None) else repo_root() / DEFAULT_MANIFEST
    try:
        if getattr(args, "config", None):
            rendered = render_serve_config_v2(Path(args.config))
        else:
            with _packaged_config() as packaged:
                rendered = render_serve_config_v2(packaged)
        try:
            manifest = out.read_text(encoding="utf-8")
        except OSError as exc:
            raise RenderError(f"cannot read the manifest {out}: {exc} (pass --out)") from exc
        if getattr(args, "check", False):
            if _serve_config_of(manifest) != rendered:
                print(
                    f"{out}: serveConfigV2 is out of date with the production Serve config; "
                    "run `instantid cluster render`",
                    file=sys.stderr,
                )
                return 1
            return 0
        updated = replace_serve_config(manifest, rendered)
        if updated != manifest:
            out.write_text(updated, encoding="utf-8")
            print(f"wrote {out}")
        else:
            print(f"{out} is up to date")
        return 0
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
