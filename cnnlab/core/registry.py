"""One registry class for every kind of component, in the style of timm.

    @MODELS.register(family="lenet")
    def lenet5(*, in_channels: int, num_classes: int, input_size: int,
               variant: Literal["classic", "modern"] = "modern") -> nn.Module: ...

    MODELS.names("res*")                    # shell-style wildcards
    MODELS.build("lenet5", {"variant": "classic"}, prefix="model",
                 in_channels=1, num_classes=10, input_size=28)

The builder's keyword-only parameters are the options a user may set; their
annotations give types and ranges (cnnlab.core.validation). Parameters listed in the
registry's ``context`` are supplied by cnnlab (e.g. a model's ``in_channels``
comes from the dataset) and may not be set in the config.

A registry may also have shared options (``Registry.share``): every entry takes them on
top of its own, and one function applies them to what the entry built. Every model,
a plugin's too, takes ``activation`` and ``drop_connect`` this way.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cnnlab.core.errors import CnnlabError, suggestion
from cnnlab.core.validation import check_value, describe_type


@dataclass(frozen=True)
class Option:
    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when required

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        return f"{self.name}: {describe_type(self.annotation)} ({default})"


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    family: str
    description: str
    options: dict[str, Option]
    meta: dict[str, Any]  # free-form facts, e.g. a dataset's input shape
    origin: str = "cnnlab"  # where it was registered: cnnlab, or a plugin (cnnlab.core.plugins)


class DuplicateName(ValueError):
    """A second registration under a name already taken (timm and torchvision refuse them too)."""


_origin = ["cnnlab"]


@contextlib.contextmanager
def registering_from(origin: str) -> Iterator[None]:
    """Entries registered inside the block record ``origin`` (a plugin's module or package)."""
    _origin.append(origin)
    try:
        yield
    finally:
        _origin.pop()


class Registry:
    def __init__(self, kind: str, plural: str, context: tuple[str, ...] = ()):
        self.kind = kind          # "model"
        self.plural = plural      # "models", as in `cnnlab list models`
        self.context = context    # parameters cnnlab supplies itself
        self._entries: dict[str, Entry] = {}
        self._shared: dict[str, Option] = {}
        self._finish: Callable[..., Any] | None = None

    def share(self, finish: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: ``finish(built, /, **options)``'s keyword options are taken by every entry (an entry's
        own option of the same name wins), and ``finish`` applies them to what the entry built."""
        self._shared, self._finish = self._options_of(finish), finish
        return finish

    def register(self, fn: Callable | None = None, *, name: str | None = None, family: str = "", **meta: Any):
        """Decorator: ``@REG.register`` or ``@REG.register(name=..., family=..., **meta)``."""

        def add(fn: Callable) -> Callable:
            entry_name = name or fn.__name__
            if entry_name in self._entries:
                taken = self._entries[entry_name].origin
                raise DuplicateName(f"{self.kind} {entry_name!r} is already registered (by {taken})")
            self._entries[entry_name] = Entry(
                name=entry_name,
                fn=fn,
                family=family,
                description=(inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " "),
                options=self._options_of(fn),
                meta=meta,
                origin=_origin[-1],
            )
            return fn

        return add(fn) if fn is not None else add

    def _options_of(self, fn: Callable) -> dict[str, Option]:
        hints = typing.get_type_hints(fn, include_extras=True)
        options = {}
        for p in inspect.signature(fn).parameters.values():
            if p.name in self.context or p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name not in hints:
                raise TypeError(f"{fn.__qualname__}: option {p.name!r} needs a type annotation")
            options[p.name] = Option(p.name, hints[p.name], p.default)
        return options

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise CnnlabError(
                f"unknown {self.kind} {name!r}{suggestion(str(name), self._entries)}; "
                f"see all with: cnnlab list {self.plural}"
            )
        entry = self._entries[name]
        if not self._shared:
            return entry
        return replace(entry, options={**entry.options, **{k: o for k, o in self._shared.items() if k not in entry.options}})

    def check_options(self, name: str, options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        """Validate ``options`` against entry ``name``'s signature; return converted kwargs."""
        entry = self.get(name)
        kwargs = {}
        for key, value in options.items():
            if key in self.context:
                raise CnnlabError(
                    f"{prefix}.{key} is set by cnnlab itself ({self.kind} context); remove it from the config"
                )
            if key not in entry.options:
                accepted = ", ".join(entry.options) or "no options"
                raise CnnlabError(
                    f"{self.kind} {name!r} has no option {key!r}{suggestion(key, entry.options)}; "
                    f"it takes: {accepted}"
                )
            kwargs[key] = check_value(f"{prefix}.{key}", value, entry.options[key].annotation)
        for option in entry.options.values():
            if option.required and option.name not in kwargs:
                raise CnnlabError(f"{prefix}.{option.name} is required for {self.kind} {name!r}")
        return kwargs

    def build(self, name: str, options: Mapping[str, Any], prefix: str, **context: Any) -> Any:
        kwargs = self.check_options(name, options, prefix)
        own = self._entries[name].options
        built = self._entries[name].fn(**context, **{k: v for k, v in kwargs.items() if k in own})
        if self._finish is None:
            return built
        return self._finish(built, **{k: v for k, v in kwargs.items() if k not in own})


DATASETS = Registry("dataset", "datasets")
MODELS = Registry("model", "models", context=("in_channels", "num_classes", "input_size"))
OPTIMIZERS = Registry("optimizer", "optimizers", context=("model",))
SCHEDULERS = Registry("scheduler", "schedulers", context=("optimizer", "steps_per_epoch", "epochs"))
INITS = Registry("init scheme", "inits", context=("model",))
AUGMENTS = Registry("augmentation", "augments")
# What a run does with its parts: classify, image_fit. cnnlab hands each the run's typed config (RunConfig)
# and its job (cnnlab.tasks.job.Job: run directory, console, test and resume choices, a sweep's on_epoch).
TASKS = Registry("task", "tasks", context=("run", "job"))
# A sweep's search: how the next trial's values are chosen, and when a trial is stopped early.
SAMPLERS = Registry("sampler", "samplers", context=("trial_number", "search_space"))
PRUNERS = Registry("pruner", "pruners", context=("max_epochs",))

REGISTRIES: dict[str, Registry] = {r.plural: r for r in (DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, INITS, AUGMENTS, TASKS,
                                                         SAMPLERS, PRUNERS)}
