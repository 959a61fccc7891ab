"""The contract: the .proto, its generated stubs, the codec, ListLosses, and the installed layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from google.protobuf import descriptor_pb2
from support.paths import ROOT

from losswire.client import LossClient
from losswire.server.losses import LOSSES
from losswire.v1 import loss_service_pb2 as pb
from losswire.wire import chunks, codec

PROTO = ROOT / "protos" / "losswire" / "v1" / "loss_service.proto"


def test_generated_stubs_are_fresh(tmp_path):
    """The checked-in stubs describe exactly the .proto (regenerate: bash protos/generate.sh)."""
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--descriptor_set_out={out}", str(PROTO)])
    assert code == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # the Python plugin does not embed them
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert fresh == checked_in, "stubs are stale: run `bash protos/generate.sh`"


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(5, dtype=torch.float16),
        torch.randn(2, 2, dtype=torch.bfloat16),
        torch.randint(-100, 100, (4,), dtype=torch.int8),
        torch.randint(-1000, 1000, (4,), dtype=torch.int16),
        torch.randint(-(2**30), 2**30, (2, 2), dtype=torch.int32),
        torch.randint(-(2**60), 2**60, (3,), dtype=torch.int64),
        torch.randint(0, 255, (6,), dtype=torch.uint8),
        torch.tensor([True, False, True]),
        torch.tensor(3.5),  # 0-d
        torch.zeros(0, 4),  # empty
        torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    ],
    ids=lambda t: f"{t.dtype}-{list(t.shape)}",
)
def test_codec_round_trip(tensor):
    message = codec.encode_tensor(tensor)
    assert len(message.data) == tensor.numel() * tensor.element_size()
    decoded = codec.decode_tensor(pb.Tensor.FromString(message.SerializeToString()), "t")
    assert decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


def test_codec_wire_format_is_little_endian_row_major():
    message = codec.encode_tensor(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert message.dtype == pb.FLOAT32 and list(message.shape) == [2, 2]
    assert message.data.hex() == "0000803f000000400000404000008040"


def test_codec_values_and_config():
    value = codec.decode_value(codec.encode_value((torch.tensor([1, 2]), torch.tensor([0.5, 0.25]))), "target")
    assert isinstance(value, tuple) and value[0].dtype == torch.int64 and value[1].tolist() == [0.5, 0.25]
    assert codec.decode_value(codec.encode_value(3), "x") == 3
    assert codec.decode_value(codec.encode_value(2.5), "x") == 2.5
    assert codec.decode_value(codec.encode_value("sum"), "x") == "sum"
    assert codec.decode_value(codec.encode_value([[0, 1], [2, 3]]), "match") == [[0, 1], [2, 3]]
    config = {"type": "CrossEntropyLoss", "class_weight": (1.0, 2.0), "use_sigmoid": False, "ignore_index": 255}
    assert codec.decode_config(codec.encode_config(config)) == {**config, "class_weight": [1.0, 2.0]}
    with pytest.raises(codec.CodecError, match=r"cannot send a torch\.complex64"):
        codec.encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_list_losses_is_the_engine_description(client: LossClient):
    response = client.list_losses()
    assert [info.name for info in response.losses] == LOSSES.names()
    for info in response.losses:
        description = LOSSES.describe(info.name).to_dict()
        params = [
            {
                "name": p.name,
                "type": p.type,
                "default": codec.python_value(p.default),
                "nullable": p.nullable,
                "choices": [codec.python_value(c) for c in p.choices] or None,
                "minimum": p.minimum if p.HasField("minimum") else None,
                "maximum": p.maximum if p.HasField("maximum") else None,
                "exclusive_minimum": p.exclusive_minimum,
                "exclusive_maximum": p.exclusive_maximum,
            }
            for p in info.params
        ]
        assert params == description["params"]
        assert [(i.name, i.kind, i.optional) for i in info.inputs] == [
            (i["name"], i["kind"], i["optional"]) for i in description["inputs"]
        ]
        assert info.output == description["output"]
        assert dict(info.output_variants) == description["output_variants"]
        assert list(info.differentiable) == description["differentiable"]
        assert list(info.value_inputs) == description["value_inputs"]
        assert info.separable == description["separable"] and info.sample_axis == description["sample_axis"]


def test_every_package_of_the_source_is_listed_for_the_wheel():
    """pyproject.toml lists packages by name (the layout maps folders onto the losswire namespace): a new
    folder of code that is not listed would be missing from the wheel and the image."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


@pytest.mark.slow
def test_wheel_installs_under_the_losswire_namespace(tmp_path):
    """`pip install .` puts losswire.server / losswire.client / losswire.v1 in site-packages, and
    no bare top-level `server` or `client` package."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(ROOT),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("losswire-*.whl")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "losswire"]
    assert not (target / "losswire" / "__init__.py").exists()  # a namespace package
    probe = (
        "import losswire.server.losses as l, losswire.client as c, losswire.v1.loss_service_pb2 as p;"
        f"assert l.__file__.startswith({str(target)!r}) and c.__file__.startswith({str(target)!r});"
        "print(len(l.LOSSES))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(LOSSES)


def test_a_streamed_tensor_must_be_what_its_message_declares():
    """``decode_tensor`` takes a streamed tensor's bytes from ``streamed`` by field path: bytes assembled for
    another declaration (another count or dtype) are refused, never reinterpreted."""
    message = pb.Tensor(dtype=pb.FLOAT64, shape=[2])
    assert codec.decode_tensor(message, "x", streamed={"x": torch.zeros(2, dtype=torch.float64)}).shape == (2,)
    for wrong in (torch.zeros(16, dtype=torch.uint8), torch.zeros(3, dtype=torch.float64)):
        with pytest.raises(codec.CodecError, match=r"x declares 2 elements of torch.float64, but"):
            codec.decode_tensor(message, "x", streamed={"x": wrong})


@pytest.mark.parametrize("declared", [[0, 4], [-3, 4], [4], [2, 2], []], ids=str)
def test_chunks_with_early_gradients_cover_every_byte_whatever_pred_declares(declared):
    """The chunker runs on any message (the fuzzing tests feed it hostile ones): pred declaring no rows,
    negative ones or a shape its bytes do not fill still goes out whole, byte for byte, for the server to
    refuse or answer as it would without early gradients."""
    request = pb.EvaluateRequest()
    term = request.terms.add(config=codec.encode_config({"type": "FocalLoss"}))
    codec.encode_tensor(torch.arange(16, dtype=torch.float32).reshape(4, 4), term.pred)
    codec.encode_tensor(torch.zeros(4, dtype=torch.int64), term.target.tensor)
    term.pred.shape[:] = declared
    sink = chunks.StreamSink.take(request, min_bytes=1)
    messages = list(chunks.stream_chunks(request, sink, raw=False, chunk_bytes=24, early_gradients=True))
    assert messages[0].request.early_gradients
    received: dict[str, bytearray] = {}
    for message in messages[1:]:
        piece = received.setdefault(message.chunk.tensor, bytearray())
        assert message.chunk.offset == len(piece)  # in order, no gap, no overlap
        piece += message.chunk.data
    assert bytes(received["terms[0].pred"]) == torch.arange(16, dtype=torch.float32).numpy().tobytes()
    assert bytes(received["terms[0].target"]) == bytes(32)
