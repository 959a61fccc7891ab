"""``type='RemoteLoss'`` in an ordinary MMDetection / mmengine config: a head's loss evaluated by losswire.

Importing this module registers ``RemoteLoss`` in mmengine's root ``MODELS`` registry. MMDetection's
``MODELS`` (and every other OpenMMLab 2.x registry of models) is a child of it, and a child registry
looks a plain name up in itself and then in its parents, so ``mmdet.registry.MODELS.build`` finds
``RemoteLoss`` with or without ``default_scope='mmdet'``. A config activates it with mmengine's
standard mechanism, which imports the module when the config is loaded::

    custom_imports = dict(imports=['losswire.client.mmdet'], allow_failed_imports=False)
    model = dict(
        bbox_head=dict(
            loss_cls=dict(type='RemoteLoss', loss='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                          loss_weight=1.0, target='losswire:50051'),
            loss_bbox=dict(type='RemoteLoss', loss='L1Loss', loss_weight=1.0, target='losswire:50051')))

``loss`` is the wrapped loss: its type name, with its parameters next to it (the *flat form* above,
which is the local dict with ``type`` renamed to ``loss`` plus ``target``), or a whole config dict
(``loss=dict(type='FocalLoss', gamma=2.0)``, the *nested form*). Both may be combined; a parameter
given twice must have one value. The flat form is the recommended one because mmdet heads read some
loss parameters from the config dict itself, before the loss is built: ``AnchorHead`` sizes its
classifier from ``loss_cls.get('use_sigmoid', False)``, so ``use_sigmoid`` hidden inside ``loss=dict(...)``
would give a softmax-sized classifier feeding a sigmoid loss. The nested form therefore refuses a true
``use_sigmoid`` that is not also stated at the top level. ``DETRHead`` reads ``class_weight`` and
``bg_cls_weight`` the same way; only the flat form passes them (and the tensor it builds) on.

The built module is a :class:`losswire.client.RemoteLoss`: its forward takes the wrapped loss's forward
arguments (``loss_cls(cls_score, labels, label_weights, avg_factor=...)``) and its gradient comes from
the server. What heads read from their loss modules is there too:

* the loss's parameters as attributes (``use_sigmoid``, ``loss_weight``, ``reduction``, ``beta``...),
  as configured or else the server's defaults; assigning one (``DynamicRoIHead`` sets
  ``loss_bbox.beta`` during training) changes the config the server evaluates, validated at once;
* the custom-classifier hooks of SeesawLoss, CrossEntropyCustomLoss, FocalCustomLoss and EQLV2Loss
  (``custom_cls_channels``, ``get_cls_channels``, ``get_activation``, ``get_accuracy``...): local
  computations on the head's scores, answered by losswire's own engine in this process.

The config is checked by the server when the model is built (one ``Describe`` call per loss), so a
misspelt loss or parameter fails before training starts. ``validate=False`` defers every server
contact to the first forward; until then only parameters stated in the config are readable
(``--cfg-options model.bbox_head.loss_cls.validate=False`` for tools that only run inference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

try:
    from mmengine.registry import MODELS
except ImportError as error:
    raise ImportError(
        "losswire.client.mmdet registers RemoteLoss in mmengine's MODELS registry and needs mmengine "
        f"(installed with MMDetection 3.x; alone: pip install 'losswire[mmdet]'). Importing it failed: {error}"
    ) from error

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from .channel import DEFAULT_TARGET
from .remote import RemoteLoss

__all__ = ["HEAD_HOOKS", "MMDetRemoteLoss", "remote_loss_config"]

# Parameters mmdet heads read from the loss *config dict* before building the loss (AnchorHead,
# AnchorFreeHead, RepPointsHead, SABLRetinaHead, GuidedAnchorHead, VFNetHead), with the value a head
# assumes when the key is absent.
HEAD_READ_KEYS = {"use_sigmoid": False}

# What heads ask a loss module beyond its parameters (BBoxHead, BaseDenseHead, FCOSHead, CascadeRoIHead):
# the V3Det-style custom classifier of SeesawLoss / *CustomLoss, and EQLV2's activation.
HEAD_HOOKS = frozenset(
    {
        "custom_cls_channels",
        "custom_activation",
        "custom_accuracy",
        "get_cls_channels",
        "get_activation",
        "get_accuracy",
    }
)


def remote_loss_config(loss: str | Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The losswire config of ``RemoteLoss(loss=..., **params)``: ``loss`` (a type name or a config dict)
    with the top-level parameters merged in; raises ValueError where a head would be misled."""
    if isinstance(loss, str):
        base: dict[str, Any] = {"type": loss}
    elif isinstance(loss, Mapping):
        base = _plain(loss)
        if not isinstance(base.get("type"), str):
            raise ValueError(f"RemoteLoss: loss=dict(...) needs a 'type' naming the loss, e.g. 'FocalLoss'; got {base}")
    else:
        raise TypeError(f"RemoteLoss: loss must be a loss type name or a config dict, got {type(loss).__name__}")
    top = _plain(params)
    for key, absent in HEAD_READ_KEYS.items():
        if key in base and key not in top and base[key] != absent:
            raise ValueError(
                f"RemoteLoss: {key}={base[key]!r} is inside loss=dict(...), where mmdet heads do not see it: "
                f"AnchorHead and its kin read loss_cls.get({key!r}, {absent!r}) from the config dict itself, "
                f"so the head would be built for {key}={absent!r}. State it at the top level: "
                f"dict(type='RemoteLoss', loss={base['type']!r}, {key}={base[key]!r}, ...)"
            )
    conflicts = sorted(k for k in top if k in base and base[k] != top[k])
    if conflicts:
        detail = ", ".join(f"{k}: {base[k]!r} in loss=dict(...) vs {top[k]!r} at the top level" for k in conflicts)
        raise ValueError(
            f"RemoteLoss: parameters given twice with different values ({detail}). A config inheriting "
            "the local loss from _base_ keeps its parameters at the top level: write them there, or "
            "replace the inherited dict with _delete_=True."
        )
    cfg = {**base, **top}
    # mmyolo/mmrotate configs name mmdet's losses with their scope ('mmdet.FocalLoss'); the server's don't
    cfg["type"] = cfg["type"].rpartition(".")[2]
    return cfg


def _plain(value: Any) -> Any:
    """ConfigDicts, tuples and tensors (DETRHead puts a class_weight tensor in the config) as JSON-like data."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    return value


def _typed_default(param: pb.ParamInfo) -> Any:
    value = codec.python_value(param.default)
    if param.type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # protobuf numbers are doubles; num_classes should read as an int
    return value


@MODELS.register_module(name="RemoteLoss")
class MMDetRemoteLoss(RemoteLoss):
    """``dict(type='RemoteLoss', loss=..., target=..., **params)``: a losswire RemoteLoss built by mmengine.

    Args:
        loss: the wrapped loss's type name (``'FocalLoss'``; a scope prefix such as ``'mmdet.'`` is
            dropped) or its whole mmdet config dict.
        target: the losswire server, ``host:port`` or a gRPC name (``dns:///losswire:50051``).
        timeout, session, seed, validate: as for :class:`losswire.client.RemoteLoss`.
        **params: the wrapped loss's parameters (``use_sigmoid``, ``gamma``, ``loss_weight``...).
    """

    def __init__(
        self,
        loss: str | Mapping[str, Any],
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        session: str | None = None,
        seed: int | None = None,
        validate: bool = True,
        **params: Any,
    ) -> None:
        self_dict = self.__dict__
        self_dict["_validate"] = validate
        self_dict["_defaults"] = None  # the loss's parameter defaults, once the server described it
        self_dict["_twin"] = None  # losswire's in-process module of this loss, for the head hooks
        super().__init__(
            remote_loss_config(loss, params), target, timeout=timeout, session=session, seed=seed, validate=validate
        )
        self_dict["_ready"] = True  # from here on, assigning a loss parameter updates the config

    @property
    def info(self) -> pb.LossInfo:
        """The server's description (fetched once); it also supplies the parameters' defaults."""
        info = RemoteLoss.info.fget(self)
        if self.__dict__["_defaults"] is None:
            self.__dict__["_defaults"] = {p.name: _typed_default(p) for p in info.params}
        return info

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_twin"] = None  # rebuilt on demand; keeps pickles free of engine modules
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules
        except AttributeError:
            pass
        state = self.__dict__
        if name.startswith("_") or "_ready" not in state:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        cfg = state["cfg"]
        if name in cfg and name != "type":
            return cfg[name]
        if name in HEAD_HOOKS:
            return self._hook(name)
        defaults = state["_defaults"]
        if defaults is not None and name in defaults:
            return defaults[name]
        if defaults is None and not state["_validate"]:
            raise AttributeError(
                f"RemoteLoss({cfg['type']}): {name!r} is not in the config, and with validate=False the "
                "server has not described the loss yet (it does at the first forward); state it in the config"
            )
        raise AttributeError(f"RemoteLoss({cfg['type']}) has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if "_ready" in self.__dict__ and not name.startswith("_") and self._is_loss_param(name):
            self._set_param(name, value)
        else:
            super().__setattr__(name, value)

    def _is_loss_param(self, name: str) -> bool:
        if name in self.__dict__ or name == "type":
            return False
        defaults = self.__dict__["_defaults"]
        return name in self.cfg or (defaults is not None and name in defaults)

    def _set_param(self, name: str, value: Any) -> None:
        """A head changing a parameter during training (DynamicRoIHead's ``loss_bbox.beta``): the server
        must evaluate the new value, so it goes into the config, checked by the server first."""
        cfg = {**self.cfg, name: _plain(value)}
        if self.__dict__["_validate"]:
            self.client.describe(cfg, self.timeout)  # a RemoteLossError names a bad value here
        self.__dict__["cfg"] = cfg
        self.__dict__["_twin"] = None  # the hooks follow the new config

    def _hook(self, name: str) -> Any:
        twin = self._local_twin(name)
        if twin is None:
            raise AttributeError(f"RemoteLoss({self.cfg['type']}) has no attribute {name!r}")
        return getattr(twin, name)

    def _local_twin(self, hook: str) -> nn.Module | None:
        """losswire's in-process module for this config, built only for a loss whose class has ``hook``.

        The hooks are cheap local computations on the head's own scores (no loss value), so they run
        here rather than over the wire; the engine ships with this package and needs only torch.
        """
        from losswire.server.losses import LOSSES  # only heads with custom classifiers need the engine

        loss_type = self.cfg["type"]
        if loss_type not in LOSSES or not hasattr(LOSSES.get(loss_type), hook):
            return None  # a plugin loss only the server knows, or a loss without this hook
        if self.__dict__["_twin"] is None:
            self.__dict__["_twin"] = LOSSES.build({k: v for k, v in self.cfg.items() if k != "sampler"})
        return self.__dict__["_twin"]
