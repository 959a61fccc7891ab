"""Every fused kernel module: importing this registers each kernel for the family it accelerates
(``losswire.server.losses`` imports it, so the table is complete whenever the engine is loaded)."""

from . import cross_entropy, focal, gfocal, iou, regression  # noqa: F401 - importing a kernel file registers it
