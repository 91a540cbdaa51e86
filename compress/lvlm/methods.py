"""Token-reduction methods by name, of four kinds (a registry is a dict):

- ``none``: all visual tokens ("full").
- ``feature``: ``fn(x (n, d), num_keep, layout) -> Reduction`` on X_IMG once per image (random, sample, spatial,
  metacompress, tprl). A prompt-dependent one (``fn.prompt_dependent``, e.g. TPRL) also takes
  ``prompt_embedding=`` (d,) of the first turn's question; the session reduces when that question arrives.
- ``llm``: inside the LLM at the first prefill (fastv, fastv_k1); ``fn`` is ignored, the session drives
  ``compress.baselines.fastv.FastV``.
- ``vision``: inside the CLIP vision tower, ``fn(vision_tower, pixel_values, num_keep, feature_layer,
  select_strategy, **options)`` (tome, prumerge, prumerge_plus, visionzip); the adapter applies the projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

KINDS = ("none", "feature", "llm", "vision")

# What a method needs from a model family (an adapter's ``capabilities``; docs/design.md §5, the README's matrix).
CAPABILITIES = {
    "clip_tower": "transformers' CLIP vision tower (the method hooks its layers)",
    "cls": "a [CLS] token in the vision tower (its attention ranks the patches)",
}
REQUIRES = {  # method name -> capabilities it needs; methods not listed run on every family
    "tome": ("clip_tower",),
    "prumerge": ("clip_tower", "cls"),
    "prumerge_adaptive": ("clip_tower", "cls"),
    "prumerge_plus": ("clip_tower", "cls"),
    "visionzip": ("clip_tower", "cls"),
}


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    fn: Callable | None = None
    options: dict = field(default_factory=dict)
    adaptive: bool = False  # the method chooses its own token count (PruMerge's IQR rule); the rate is ignored

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {KINDS}")


METHODS: dict[str, Method] = {
    "full": Method("full", "none"),
    "fastv": Method("fastv", "llm"),
    # FastV ranking with LLM layer 0 and pruning before layer 1: on a shallow LLM (the 3-layer references) the
    # paper's K = 2 runs most of the model on every token (docs/design.md §4.4.2); K = 1 is the nearest to the
    # paper's share (2 of 32 layers). ``options["k"]`` overrides the session's ``fastv_k``.
    "fastv_k1": Method("fastv_k1", "llm", options={"k": 1}),
}


def register_method(name: str, kind: str, fn: Callable | None = None, **options) -> Method:
    """Add (or replace) a method in the registry."""
    METHODS[name] = Method(name, kind, fn, options)
    return METHODS[name]


def available_methods() -> dict[str, Method]:
    """The built-in methods plus the project's reducers: ``compress.baselines.FEATURE_REDUCERS``,
    ``compress.baselines.vision.VISION_REDUCERS`` and ``metacompress`` (needs a compressor directory)."""
    from compress.baselines import FEATURE_REDUCERS
    from compress.baselines.vision import VISION_REDUCERS

    out = {name: Method(name, "feature", fn) for name, fn in FEATURE_REDUCERS.items()}
    out.update({name: Method(name, "vision", fn) for name, fn in VISION_REDUCERS.items()})
    out["prumerge_adaptive"] = Method("prumerge_adaptive", "vision", VISION_REDUCERS["prumerge"], adaptive=True)
    out["metacompress"] = Method("metacompress", "feature")  # fn bound by get_method from the compressor
    out["tprl"] = Method("tprl", "feature")  # fn bound by get_method from the trained policy
    out.update(METHODS)
    return out


def get_method(name: str, compressor=None) -> Method:
    """The method called ``name``. ``compressor``: a ``MetaCompress`` module or the directory of one (required for
    ``metacompress``); for ``tprl`` a ``TPRLReducer`` or the policy directory of the tprl stage. Unknown names raise
    ValueError listing the known ones."""
    methods = available_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(methods))}")
    method = methods[name]
    if name == "metacompress" and method.fn is None:
        if compressor is None:
            raise ValueError("method 'metacompress' needs a trained compressor: pass --compressor DIR")
        if not callable(compressor):
            from compress.metacompress import MetaCompress

            compressor = MetaCompress.from_pretrained(compressor).eval()
        method = Method(name, "feature", compressor)
    if name == "tprl" and method.fn is None:
        if compressor is None:
            raise ValueError("method 'tprl' needs a trained policy: pass the tprl stage's policy directory "
                             "(<work_dir>/tprl/policy) as the compressor")
        if not callable(compressor):
            from compress.tprl import TPRLPolicy, TPRLReducer

            compressor = TPRLReducer(TPRLPolicy.from_pretrained(compressor))
        method = Method(name, "feature", compressor)
    return method


STOCHASTIC_METHODS = ("random",)  # methods whose result depends on a seed (evaluated once per evaluate.seeds)


def seeded_method(name: str, seed: int) -> Method:
    """A stochastic method with its per-image seeding (``random``: ``compress.baselines.random.PerImageRandom``;
    name the images with ``method.fn.for_images(ids)`` before reducing them)."""
    if name not in STOCHASTIC_METHODS:
        raise ValueError(f"method {name!r} takes no seed; stochastic methods: {', '.join(STOCHASTIC_METHODS)}")
    from compress.baselines.random import PerImageRandom

    return Method(name, "feature", PerImageRandom(seed))


def needs(method: Method) -> tuple[str, ...]:
    """The capabilities ``method`` needs; any vision-tower method (one registered later too) needs the CLIP tower."""
    return REQUIRES.get(method.name, ("clip_tower",) if method.kind == "vision" else ())


def check_applicable(method: Method, adapter) -> None:
    """Refuse, by name, a method whose signal the adapter's family lacks (a [CLS]-ranked baseline on a tower without
    [CLS]); the message lists the methods that do apply."""
    missing = [c for c in needs(method) if c not in adapter.capabilities]
    if missing:
        usable = sorted(n for n, m in available_methods().items() if all(c in adapter.capabilities for c in needs(m)))
        what = " and ".join(CAPABILITIES[c] for c in missing)
        raise ValueError(f"method {method.name!r} needs {what}, which {adapter.family} ({adapter.model_dir}) does not "
                         f"have; methods that apply: {', '.join(usable)}")
