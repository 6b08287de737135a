"""Example configs shipped inside the package: name one (``-c flickr8k_heads``) or give any YAML path.

``cliplab configs`` lists them. A path that exists wins over a packaged name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cliplab.errors import ConfigError


def packaged_configs() -> dict[str, Path]:
    """Packaged config name -> file, sorted by name."""
    folder = resources.files(__name__)
    return {Path(str(f)).stem: Path(str(f)) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def describe(path: Path) -> str:
    """The first comment line of a config (what it is for)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(spec: str | Path) -> Path:
    """A config file from a path or a packaged name (``flickr8k_heads`` or ``flickr8k_heads.yaml``)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    known = packaged_configs()
    if str(spec) in (name, f"{name}.yaml") and name in known:
        return known[name]
    hint = f"packaged configs: {', '.join(known)}" if known else "no packaged configs found"
    raise ConfigError(f"config not found: {spec} (not a file, nor a packaged config name; {hint})")


def read_yaml_config(spec: str | Path) -> dict:
    """The mapping in a config file (path or packaged name); invalid YAML is a one-line error."""
    import yaml

    path = resolve_config(spec)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    return raw


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``section.key=value`` overrides (values parsed as YAML) applied to a config dict, in place; unknown
    keys and sections are errors naming them."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: no section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(value)
    return config
