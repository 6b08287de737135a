"""Model kinds: the extension point of :func:`cliplab.models.factory.load_model` and of training runs
(open_clip's / timm's model registries).

A kind says how a model is named and built:

- ``prefix``: the specs it answers: ``"conse"`` answers ``conse`` and ``conse:ANYTHING``, ``"clip:"`` only
  ``clip:ANYTHING``;
- ``detect_folder``: a saved model folder it recognises: a marker file name (``cliplab_config.json``) or a
  function of the folder;
- ``load(spec)``: the :class:`~cliplab.models.base.EmbeddingModel` for a spec it answers (the whole spec string,
  prefix included) or for a folder it detected (the folder's path as a string);
- ``create(config, seed)`` and ``config``: what a training run builds from its ``model`` section
  (``model.kind: NAME``): ``config`` turns that section into a settings object (``from_dict`` / ``to_dict``;
  default: the plain dict), ``create`` returns a :class:`~cliplab.models.base.TrainableModel`;
- ``baseline(model)``: ``(name, model)``, the zero-shot model a training run reports before training (its
  features are the run's cached features of the untrained model), or None.

A new kind is one :func:`register_model_kind` call; the built-in ones are registered in
:mod:`cliplab.models.factory`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cliplab.errors import ConfigError


@dataclass(frozen=True)
class ModelKind:
    name: str
    load: Callable[[str], Any]
    prefix: str | None = None
    detect_folder: Callable[[Path], bool] | None = None
    marker: str | None = None  # the file that marks its folders (for messages)
    create: Callable[[Any, int | None], Any] | None = None
    config: Any = None  # a class with from_dict(dict) / to_dict(); None: the model section as a dict
    baseline: Callable[[Any], tuple[str, Any]] | None = None
    usage: str | None = None  # how a user names it, for messages ('clip:SPEC')

    def answers(self, spec: str) -> bool:
        """Whether ``spec`` names this kind by its prefix."""
        if not self.prefix:
            return False
        head = self.prefix if self.prefix.endswith(":") else self.prefix + ":"
        return spec == self.prefix or spec.startswith(head)

    def settings(self, section: dict) -> Any:
        """This kind's training settings from a run config's ``model`` section (without ``kind``)."""
        if self.create is None:
            raise ConfigError(f"model.kind {self.name!r} cannot be trained (it registers no create); trainable "
                              f"kinds: {', '.join(trainable_kinds())}")
        return self.config.from_dict(section) if self.config is not None else dict(section)


MODEL_KINDS: dict[str, ModelKind] = {}


def _kinds() -> dict[str, ModelKind]:
    """The registered kinds, the built-in ones included (registered when :mod:`cliplab.models.factory` loads)."""
    import cliplab.models.factory  # noqa: F401

    return MODEL_KINDS


def register_model_kind(name: str, *, load: Callable[[str], Any], prefix: str | None = None,
                        detect_folder: str | Callable[[Path], bool] | None = None,
                        create: Callable[[Any, int | None], Any] | None = None, config: Any = None,
                        baseline: Callable[[Any], tuple[str, Any]] | None = None,
                        usage: str | None = None) -> ModelKind:
    """Add (or replace) a model kind; see the module docstring. Returns it (undo with
    :func:`unregister_model_kind`)."""
    if not prefix and detect_folder is None and create is None:
        raise ValueError(f"model kind {name!r}: give a prefix, a detect_folder or a create")
    marker = detect_folder if isinstance(detect_folder, str) else None
    detect = (lambda path: (path / marker).is_file()) if marker else detect_folder
    kind = ModelKind(name, load, prefix, detect, marker, create, config, baseline,
                     usage or (f"'{prefix}'" if prefix and not prefix.endswith(":") else
                               f"'{prefix}SPEC'" if prefix else None))
    _kinds()[name] = kind  # the built-in kinds first, so that a registration can replace one
    return kind


def unregister_model_kind(name: str) -> None:
    MODEL_KINDS.pop(name, None)


def model_kind(name: str) -> ModelKind:
    """The registered kind ``name`` (a training run's ``model.kind``)."""
    kinds = _kinds()
    if name not in kinds:
        raise ConfigError(f"unknown model.kind {name!r}; registered kinds: {', '.join(kinds)}")
    return kinds[name]


def trainable_kinds() -> list[str]:
    return [k.name for k in _kinds().values() if k.create is not None]


def kind_for_spec(spec: str) -> ModelKind | None:
    """The kind whose prefix answers ``spec`` (the first registered one), or None."""
    return next((k for k in _kinds().values() if k.answers(spec)), None)


def kind_for_folder(path: Path) -> ModelKind | None:
    """The kind that recognises the model folder ``path`` (the first registered one), or None."""
    if not path.is_dir():
        return None
    return next((k for k in _kinds().values() if k.detect_folder is not None and k.detect_folder(path)), None)


def spec_usage() -> str:
    """How the registered kinds are named, for messages: ``'conse', 'clip:SPEC', ...``."""
    return ", ".join(k.usage for k in _kinds().values() if k.prefix and k.usage)


def folder_markers() -> str:
    return " or ".join(k.marker for k in _kinds().values() if k.marker)
