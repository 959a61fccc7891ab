# RetinaNet R50-FPN 1x COCO from MMDetection 3.x, with both of its head's losses evaluated by a
# losswire server. Everything but the two loss dicts and the import line is MMDetection's own config.
#
#   losswire serve --port 50051                  # on the loss host (a GPU node, or this machine)
#   LOSSWIRE_TARGET=losshost:50051 python tools/train.py retinanet_remote_loss.py
#
# The head code is unchanged: RetinaHead builds `loss_cls` and `loss_bbox` with MODELS.build as usual
# and finds 'RemoteLoss' in mmengine's root registry, which mmdet's registry falls back to.
_base_ = "mmdet::retinanet/retinanet_r50_fpn_1x_coco.py"

# The one addition: mmengine imports this module while loading the config, which registers RemoteLoss.
custom_imports = dict(imports=["losswire.client.mmdet"], allow_failed_imports=False)

model = dict(
    bbox_head=dict(
        # The local dict with `type` renamed to `loss`. The parameters stay at the top level, where
        # RetinaHead reads `use_sigmoid` from the config to size its classifier. Without `target=`, the
        # loss dials $LOSSWIRE_TARGET (else localhost:50051); `target="losshost:50051"` pins one server.
        loss_cls=dict(
            type="RemoteLoss",
            loss="FocalLoss",
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0,
            timeout=60.0,
        ),
        loss_bbox=dict(type="RemoteLoss", loss="L1Loss", loss_weight=1.0, timeout=60.0),
    )
)
