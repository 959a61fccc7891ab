"""What a term will cost, checked before anything of it is built or allocated.

Each loss declares the memory its config and input shapes imply (``losses.cost``): C x C, B x B tables,
per-class buffers, a multiple of the inputs. Two limits hold for every term before any module is built:
what building its module may take (``max_module_bytes``: a loss's buffers are kilobytes for any real
config, so a 37-byte config with ``bins=2.5e8`` is refused, not allocated), and how much working memory it
may need for the bytes it brings (``ratio`` times its inputs' bytes, plus ``floor``: a loss costs a few
times its inputs, so a 32 KB SeesawLoss call with 8000 classes (C x C) or TripletLoss on 8000 samples
(B x B) is refused naming the parameter). Then, while the term runs, its estimate is reserved in the
server's memory budget (``budget.MemoryBudget``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..caches import BoundedCache, held_bytes
from ..errors import LimitExceededError
from ..evaluation import TermRequest, split_sampler
from ..losses import Registry
from ..losses.cost import Estimate

CACHE_SIZE = 1024  # estimates of (config, shapes) seen before: a training loop repeats both every step
CACHE_BYTES = 16 << 20  # of their keys: a class_weight of 90,000 numbers is keyed by 720 KB


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _shape(value: Any) -> tuple[int, ...] | list[tuple[int, ...]] | None:
    if isinstance(value, Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    if isinstance(value, list):
        # a JSON list (AssociativeEmbeddingLoss's match: per image a list of corner pairs): its length and
        # its members' lengths added up
        return (len(value), sum(len(v) for v in value if isinstance(v, (list, tuple))))
    return None


DEFAULT_MODULE_BYTES = 64 << 20
DEFAULT_RATIO = 64
DEFAULT_FLOOR = 256 << 20


class TermCosts:
    """Estimates of terms by the losses of ``registry``, remembered for configs and shapes seen before, and
    the two limits every term's estimate must keep (see the module docstring; None: unbounded)."""

    def __init__(
        self,
        registry: Registry,
        max_module_bytes: int | None = DEFAULT_MODULE_BYTES,
        ratio: int | None = DEFAULT_RATIO,
        floor: int = DEFAULT_FLOOR,
    ) -> None:
        self.registry = registry
        self.max_module_bytes, self.ratio, self.floor = max_module_bytes, ratio, floor
        self._seen: BoundedCache[Estimate] = BoundedCache(CACHE_SIZE, CACHE_BYTES)

    def estimate(self, term: TermRequest) -> tuple[Estimate, str]:
        """The term's estimate, and the field its driving parameter is (``config.num_classes``, ``pred``...)."""
        config, _ = split_sampler(term.config)
        # a config without a type is refused here, clearly
        description = self.registry.describe(self.registry.loss_type(config, term.config_key))
        names = [spec.name for spec in description.inputs]
        shapes = self._shapes(term, names)
        itemsize = term.pred.element_size() if term.pred.is_floating_point() else 4
        key: Any = None
        if term.config_key is not None:
            key = (term.config_key, tuple(sorted((k, repr(v)) for k, v in shapes.items())), itemsize)
        found = self._seen.get(key) if key is not None else None
        if found is None:
            found = self.registry.estimate(config, shapes, itemsize=itemsize)
            if key is not None:
                self._seen.put(key, found, held_bytes(key))
        return found, self._field(found.parameter, names, {p.name for p in description.params})

    def check(self, term: TermRequest, path: str = "") -> tuple[Estimate, str]:
        """The term's estimate and its field, refused (LimitExceededError naming the field under ``path``,
        the term's: ``terms[1].``) when over a limit."""
        estimate, field = self.estimate(term)
        loss = f"{term.config.get('type')} on pred {list(term.pred.shape)}"
        self.check_module(estimate, loss, f"{path}config.{estimate.module_parameter}")
        if self.ratio is not None:
            brought = sum(_nbytes(value) for value in (term.pred, term.target, term.weight, *term.inputs.values()))
            allowed = self.floor + self.ratio * brought
            if estimate.forward_bytes > allowed:
                raise LimitExceededError(
                    f"{loss} would need about {estimate.forward_bytes} bytes of working memory (driven by "
                    f"{estimate.forward_parameter}) for {brought} bytes of inputs; this server allows a term "
                    f"{self.ratio} times its inputs' bytes plus {self.floor} (losswire serve --term-memory-ratio)",
                    field=path + field,
                )
        return estimate, field

    def check_module(self, estimate: Estimate, loss: str, field: str) -> None:
        """Refuse a module whose building would take more than ``max_module_bytes``."""
        if self.max_module_bytes is not None and estimate.module_bytes > self.max_module_bytes:
            raise LimitExceededError(
                f"building {loss} would take about {estimate.module_bytes} bytes (driven by "
                f"{estimate.module_parameter}); this server builds loss modules of at most {self.max_module_bytes} "
                "(losswire serve --max-module-bytes)",
                field=field,
            )

    @staticmethod
    def _shapes(term: TermRequest, names: list[str]) -> dict[str, Any]:
        shapes: dict[str, Any] = {names[0]: tuple(term.pred.shape)}
        sent: Mapping[str, Any] = {
            **({names[1]: term.target} if len(names) > 1 and term.target is not None else {}),
            **({"weight": term.weight} if term.weight is not None else {}),
            **term.inputs,
        }
        for name, value in sent.items():
            shape = _shape(value)
            if shape is not None and name in names:
                shapes[name] = shape
        return shapes

    @staticmethod
    def _field(parameter: str, names: list[str], params: set[str]) -> str:
        """The request field of a term that ``parameter`` (a config key or a forward input) is."""
        if parameter in params:
            return f"config.{parameter}"
        if names and parameter == names[0]:
            return "pred"
        if len(names) > 1 and parameter == names[1]:
            return "target"
        return "weight" if parameter == "weight" else f"inputs[{parameter}]"
