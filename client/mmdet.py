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
* with MMDetection installed, the module is also an instance of mmdet's own class for the loss
  (``RemoteSmoothL1Loss`` derives from ``RemoteLoss`` and from mmdet's ``SmoothL1Loss``), so the
  heads' ``isinstance`` checks pass (``DynamicRoIHead``, the DETR family's QualityFocalLoss branch) and
  the custom-classifier hooks of SeesawLoss, CrossEntropyCustomLoss, FocalCustomLoss and EQLV2Loss
  (``custom_cls_channels``, ``get_cls_channels``, ``get_activation``, ``get_accuracy``...) are mmdet's
  own code, run in this process on the head's scores. Without MMDetection no head asks for them, and
  the module has none.

The config is checked by the server when the model is built (one ``Describe`` call per loss), so a
misspelt loss or parameter fails before training starts. ``validate=False`` defers every server
contact to the first forward; until then only parameters stated in the config are readable
(``--cfg-options model.bbox_head.loss_cls.validate=False`` for tools that only run inference).
The first description of each loss type is logged to the run's log (mmengine's current logger) with
the server's version and the loss's implementation digest, so a run records what computed its losses.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import threading
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

try:
    from mmengine.logging import MMLogger
    from mmengine.registry import MODELS
except ImportError as error:
    raise ImportError(
        "losswire.client.mmdet registers RemoteLoss in mmengine's MODELS registry and needs mmengine "
        f"(installed with MMDetection 3.x; alone: pip install 'losswire[mmdet]'). Importing it failed: {error}"
    ) from error

from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import codec

from .module import RemoteLoss
from .targets import Target

__all__ = ["HEAD_HOOKS", "MMDetRemoteLoss", "remote_loss_config"]

log = logging.getLogger("losswire.client.mmdet")

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
    """ConfigDicts, tuples, tensors (DETRHead puts a class_weight tensor in the config) and numpy scalars
    (DynamicRoIHead's median beta) as JSON-like data."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if not isinstance(value, (bool, int, float, str)) and getattr(value, "ndim", None) == 0:
        return value.item()  # a numpy scalar
    return value


def _typed_default(param: pb.ParamInfo) -> Any:
    value = codec.python_value(param.default)
    if param.type == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # protobuf numbers are doubles; num_classes should read as an int
    return value


def _loss_type(loss: Any) -> str | None:
    """The wrapped loss's type name without a scope prefix, if ``loss`` names one."""
    name = loss.get("type") if isinstance(loss, Mapping) else loss
    return name.rpartition(".")[2] if isinstance(name, str) else None


@functools.cache
def mmdet_class(loss_type: str) -> type[nn.Module] | None:
    """MMDetection's own class for ``loss_type``; None without mmdet, or for a loss mmdet does not have
    (a plugin only the server knows)."""
    if importlib.util.find_spec("mmdet") is None:
        return None
    try:
        from mmdet.registry import MODELS as MMDET_MODELS

        found = MMDET_MODELS.get(loss_type)
    except Exception as error:  # mmdet installed but its models do not import here (e.g. mmcv's ops)
        log.warning("losswire: MMDetection's %s could not be imported (%s); RemoteLoss stands alone", loss_type, error)
        return None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


_REMOTE_CLASSES: dict[type, type] = {}
_REMOTE_CLASSES_LOCK = threading.Lock()


def remote_class(loss_type: str | None) -> type[MMDetRemoteLoss]:
    """The class a ``RemoteLoss`` of ``loss_type`` is built as: with mmdet, ``Remote<Name>`` deriving from
    :class:`MMDetRemoteLoss` and from mmdet's class, made once per class; else :class:`MMDetRemoteLoss`."""
    local = mmdet_class(loss_type) if loss_type else None
    if local is None:
        return MMDetRemoteLoss
    with _REMOTE_CLASSES_LOCK:
        remote = _REMOTE_CLASSES.get(local)
        if remote is None:
            name = f"Remote{local.__name__}"
            namespace = {"__module__": __name__, "__qualname__": name, "local_class": local}
            # MMDetRemoteLoss first: its forward, attributes and pickling win; mmdet's class gives the
            # isinstance checks and the methods heads call (the classifier hooks)
            remote = _REMOTE_CLASSES[local] = type(name, (MMDetRemoteLoss, local), namespace)
        return remote


def _rebuild(loss_type: str | None) -> MMDetRemoteLoss:
    """An empty module of ``loss_type``'s remote class, for unpickling (its state comes next)."""
    return nn.Module.__new__(remote_class(loss_type))


_LOGGED: set[tuple[str, str, str]] = set()  # (run's logger, loss type, implementation) already logged
_LOGGED_LOCK = threading.Lock()


def _log_provenance(description: pb.DescribeResponse, target: str) -> None:
    """One line per loss type (and implementation) in the run's log (mmengine's current logger), naming
    the server and what computes the loss."""
    logger = MMLogger.get_current_instance()
    key = (logger.instance_name, description.loss.name, description.loss.implementation)
    with _LOGGED_LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.info(
        f"losswire: {description.loss.name} is computed by the losswire server at {target} "
        f"(losswire {description.server_version or 'of unknown version'}, "
        f"implementation {description.loss.implementation or 'not reported'})"
    )


@MODELS.register_module(name="RemoteLoss")
class MMDetRemoteLoss(RemoteLoss):
    """``dict(type='RemoteLoss', loss=..., target=..., **params)``: a losswire RemoteLoss built by mmengine.

    With MMDetection installed the module is built as a subclass of mmdet's class for the loss too
    (see :func:`remote_class`), so heads that check ``isinstance(loss, SmoothL1Loss)`` accept it.

    Args:
        loss: the wrapped loss's type name (``'FocalLoss'``; a scope prefix such as ``'mmdet.'`` is
            dropped) or its whole mmdet config dict.
        target: the losswire server, ``host:port`` or a gRPC name (``dns:///losswire:50051``); None (the
            default): ``$LOSSWIRE_TARGET``, else ``localhost:50051``.
        timeout, session, seed, validate, expect: as for :class:`losswire.client.RemoteLoss`.
        **params: the wrapped loss's parameters (``use_sigmoid``, ``gamma``, ``loss_weight``...).
    """

    local_class: type[nn.Module] | None = None  # mmdet's class this one derives from, if any

    def __new__(cls, loss: str | Mapping[str, Any] | None = None, *args: Any, **kwargs: Any) -> MMDetRemoteLoss:
        return nn.Module.__new__(remote_class(_loss_type(loss)) if cls is MMDetRemoteLoss else cls)

    def __init__(
        self,
        loss: str | Mapping[str, Any],
        target: Target | None = None,
        *,
        timeout: float | None = None,
        session: str | None = None,
        seed: int | None = None,
        validate: bool = True,
        expect: str | None = None,
        **params: Any,
    ) -> None:
        self_dict = self.__dict__
        self_dict["_validate"] = validate
        self_dict["_defaults"] = None  # the loss's parameter defaults, once the server described it
        self_dict["_twin"] = None  # mmdet's local module of this config, for attributes its __init__ sets
        super().__init__(
            remote_loss_config(loss, params),
            target,
            timeout=timeout,
            session=session,
            seed=seed,
            validate=validate,
            expect=expect,
        )
        self_dict["_ready"] = True  # from here on, assigning a loss parameter updates the config

    def _accept_description(self, description: pb.DescribeResponse) -> None:
        """The description also supplies the parameters' defaults, and goes into the run's log once."""
        super()._accept_description(description)
        self.__dict__["_defaults"] = {p.name: _typed_default(p) for p in description.loss.params}
        _log_provenance(description, self._target_label())

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        # a Remote<Name> class is made at run time: unpickling makes it again (or a plain one without mmdet)
        return _rebuild, (self.cfg.get("type"),), self.__getstate__()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_twin"] = None  # rebuilt on demand; keeps pickles free of mmdet modules
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
        defaults = state["_defaults"]
        if defaults is not None and name in defaults:
            return defaults[name]
        found, value = self._derived_attribute(name)
        if found:
            return value
        if defaults is None and not state["_validate"]:
            raise AttributeError(
                f"RemoteLoss({cfg['type']}): {name!r} is not in the config, and with validate=False the "
                "server has not described the loss yet (it does at the first forward); state it in the config"
            )
        if name in HEAD_HOOKS and self.local_class is None:
            raise AttributeError(
                f"RemoteLoss({cfg['type']}) has no attribute {name!r}: the classifier hooks are MMDetection's own "
                "code, and only a module built with mmdet importable has them"
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
        description = self.client.describe(cfg, self.timeout) if self.__dict__["_validate"] else None
        self.__dict__["cfg"] = cfg  # only once the server accepted it: a RemoteLossError keeps the old one
        self.__dict__["_twin"] = None  # the local attributes follow the new config
        if description is not None:
            self._accept_description(description)

    def _derived_attribute(self, name: str) -> tuple[bool, Any]:
        """What mmdet's ``__init__`` sets beyond the loss's parameters (``custom_cls_channels``...), read
        from mmdet's module of this config; parameters themselves are the config's or the server's."""
        local = self.local_class
        if local is None or name in inspect.signature(local.__init__).parameters:
            return False, None
        twin = self._local_twin()
        value = vars(twin).get(name, _ABSENT) if twin is not None else _ABSENT
        if value is _ABSENT or isinstance(value, (Tensor, nn.Module)):
            return False, None  # mmdet's buffers are the server's state
        return True, value

    def _local_twin(self) -> nn.Module | None:
        """mmdet's module for this config, built once (losses have no parameters; a few small buffers)."""
        if self.__dict__["_twin"] is None:
            params = {k: v for k, v in self.cfg.items() if k not in ("type", "sampler")}
            try:
                self.__dict__["_twin"] = self.local_class(**params)
            except Exception as error:  # a config mmdet's class does not take (losswire's own parameters)
                log.debug("losswire: mmdet's %s(%s) could not be built: %s", self.local_class.__name__, params, error)
                return None
        return self.__dict__["_twin"]


_ABSENT = object()
