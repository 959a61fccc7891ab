"""losswire's thin client: ``RemoteLoss``, a torch.nn.Module whose forward and backward cross the wire."""
