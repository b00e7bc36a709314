"""Where every operator of a DALI graph runs, read from the graph's serialized definition.

DALI defines and serializes a pipeline that holds GPU operators with ``device_id=None`` on a machine
without CUDA (only ``build()`` needs a GPU), so the ``device="gpu"`` graphs of :mod:`unmix.pipeline.loaders`
can be checked in CPU CI. :func:`device_report` serializes a pipeline (``pipe.serialize()``, the
protobuf ``dali_proto.PipelineDef`` of DALI's ``dali.proto``), decodes it (a few lines of protobuf wire
format; DALI ships no Python bindings for it) and follows the image data through the graph:

- the *image* tensors are the decoder's outputs and everything computed from them through an
  operator's data inputs (argument inputs, e.g. a per-sample ``mirror`` flag, carry no image data);
- an operator with an image input is an *image operator*: on a GPU graph it must run on the GPU and
  read its image inputs there; the decoder must be ``"mixed"`` (nvJPEG); no image may be an argument
  input (those live on the host);
- everything else may stay on the CPU (the reader, scalar draws, box and blur-kernel arithmetic), as
  long as no host source operator is asked (its ``shape`` argument) for more than ``max_host_elements``
  values per sample: an image-sized mask or noise drawn on the CPU and copied to the GPU every batch.
  (Sizes are not in the serialized graph: a host tensor grown by broadcasting small ones is not seen.)
- host tensors that GPU operators read as data are listed as ``transfers`` (``lam`` for mixup: one
  float per sample).

``device_report(pipe).problems`` is empty for a correct GPU graph; ``str(report)`` prints the table.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DECODER_SCHEMAS = (
    "decoders__Image",
    "decoders__ImageCrop",
    "decoders__ImageSlice",
    "decoders__ImageRandomCrop",
)

# dali.proto field numbers (dali/pipeline/proto/dali.proto, proto2)
_PIPE_OP, _PIPE_OUTPUTS = 5, 7  # PipelineDef.op, PipelineDef.pipe_outputs
_OP_NAME, _OP_INPUT, _OP_OUTPUT, _OP_ARGS, _OP_INST = 1, 2, 3, 4, 5  # OpDef
_IO_NAME, _IO_DEVICE, _IO_IS_ARG, _IO_ARG_NAME = 1, 2, 3, 4  # InputOutput
_ARG_NAME, _ARG_FLOATS, _ARG_INTS, _ARG_STRINGS, _ARG_BOOLS, _ARG_EXTRA = 1, 3, 4, 5, 6, 7  # Argument


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> list[tuple[int, Any]]:
    """Protobuf wire format -> [(field number, value)]: int for varints, bytes for everything else."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"not a DALI pipeline protobuf: wire type {wire} at byte {i}")
        out.append((number, value))
    return out


@dataclass(frozen=True)
class Port:
    """One input or output of an operator: the tensor's name and the device it is on there."""

    name: str
    device: str
    arg_name: str | None = None  # the argument an argument input feeds; None for data inputs/outputs


@dataclass(frozen=True)
class OpInfo:
    """One operator of the serialized graph."""

    schema: str  # DALI schema name, e.g. "RandomResizedCrop", "decoders__Image"
    name: str  # instance name
    device: str  # "cpu", "gpu" or "mixed"
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    shape_elements: int | None = None  # product of a ``shape`` argument, if the operator has one
    image: bool = False  # reads image data (set by device_report)
    arguments: dict[str, Any] = field(default_factory=dict, compare=False)  # scalar arguments by name


def _port(buf: bytes) -> Port:
    f = dict(_fields(buf))
    arg = f.get(_IO_ARG_NAME)
    return Port(f[_IO_NAME].decode(), f[_IO_DEVICE].decode(), arg.decode() if f.get(_IO_IS_ARG) else None)


def _scalar(arg: list[tuple[int, Any]]) -> Any:
    """The value of a scalar ``Argument`` (float, int, string or bool); None for a list (extra_args)."""
    for number, value in arg:
        if number == _ARG_FLOATS:
            return struct.unpack("<f", value)[0]
        if number == _ARG_INTS:
            return value - (1 << 64) if value >= 1 << 63 else value
        if number == _ARG_STRINGS:
            return value.decode()
        if number == _ARG_BOOLS:
            return bool(value)
    return None


def _op(buf: bytes) -> OpInfo:
    schema = inst = ""
    device = "cpu"
    shape_elements = None
    inputs, outputs = [], []
    arguments: dict[str, Any] = {}
    for number, value in _fields(buf):
        if number == _OP_NAME:
            schema = value.decode()
        elif number == _OP_INST:
            inst = value.decode()
        elif number == _OP_INPUT:
            inputs.append(_port(value))
        elif number == _OP_OUTPUT:
            outputs.append(_port(value))
        elif number == _OP_ARGS:
            arg = _fields(value)
            name = dict(arg).get(_ARG_NAME, b"").decode()
            arguments[name] = _scalar(arg)
            if name == "device":
                device = next(v.decode() for k, v in arg if k == _ARG_STRINGS)
            elif name == "shape":
                ints = [v for k, v in arg if k == _ARG_INTS]  # a scalar; a list is in extra_args
                ints += [v for k, sub in arg if k == _ARG_EXTRA for kk, v in _fields(sub) if kk == _ARG_INTS]
                ints = [v - (1 << 64) if v >= 1 << 63 else v for v in ints]  # int64 as two's complement
                shape_elements = math.prod(ints) if ints and min(ints) >= 0 else None
    return OpInfo(schema, inst, device, tuple(inputs), tuple(outputs), shape_elements, arguments=arguments)


def parse_pipeline(serialized: bytes) -> tuple[list[OpInfo], list[Port]]:
    """The operators (in the serialized order) and the pipeline outputs of ``pipe.serialize()``."""
    ops, outputs = [], []
    for number, value in _fields(serialized):
        if number == _PIPE_OP:
            ops.append(_op(value))
        elif number == _PIPE_OUTPUTS:
            outputs.append(_port(value))
    return ops, outputs


@dataclass
class DeviceReport:
    """Devices of a DALI graph's operators and what breaks the GPU contract (see the module docstring)."""

    ops: list[OpInfo]
    outputs: list[tuple[Port, bool]]  # pipeline outputs with "is an image"
    transfers: list[str]  # host tensors that GPU operators read as data (copied every batch)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def decoders(self) -> list[OpInfo]:
        return [op for op in self.ops if op.schema in DECODER_SCHEMAS]

    def devices(self, image: bool) -> dict[str, int]:
        """How many image (or non-image) operators run on each device."""
        out: dict[str, int] = {}
        for op in self.ops:
            if op.image == image and op.schema not in DECODER_SCHEMAS:
                out[op.device] = out.get(op.device, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [
            f"decoder: {', '.join(op.device for op in self.decoders) or 'none'}; "
            f"image operators by device: {self.devices(True)}; other operators: {self.devices(False)}",
            "outputs: "
            + ", ".join(f"{p.name} ({p.device}{', image' if img else ''})" for p, img in self.outputs),
            "host tensors read by GPU operators: " + (", ".join(self.transfers) or "none"),
        ]
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["GPU graph: ok"]
        return "\n".join(lines)


def _image_tensors(ops: list[OpInfo]) -> set[str]:
    """Names of the decoders' outputs and of every tensor computed from them through data inputs."""
    names = {p.name for op in ops if op.schema in DECODER_SCHEMAS for p in op.outputs}
    grew = True
    while grew:  # to a fixed point: no assumption about the order of the serialized operators
        grew = False
        for op in ops:
            if any(p.arg_name is None and p.name in names for p in op.inputs):
                new = {p.name for p in op.outputs} - names
                names |= new
                grew = grew or bool(new)
    return names


def device_report(
    pipe: Any, output_names: list[str] | None = None, max_host_elements: int = 256
) -> DeviceReport:
    """Check the DALI pipeline ``pipe`` (defined, not necessarily built; or its ``serialize()`` bytes)
    against the GPU contract: ``mixed`` decoder, every image operator on the GPU, only small host work.

    Defining a GPU pipeline needs no CUDA: pass ``device_id=None`` (e.g.
    ``pretrain_pipeline(..., device="gpu", device_id=None)``). A CPU graph (``device="cpu"``) reports its
    CPU decoder and image operators as problems: the contract is the GPU one. ``output_names`` (e.g.
    :func:`unmix.pipeline.loaders.pretrain_outputs`) name the pipeline outputs in the report.
    """
    serialized = pipe if isinstance(pipe, bytes | bytearray) else pipe.serialize()
    raw_ops, pipe_outputs = parse_pipeline(bytes(serialized))
    image_names = _image_tensors(raw_ops)
    ops: list[OpInfo] = []
    problems: list[str] = []
    transfers: set[str] = set()
    produced_on = {p.name: p.device for op in raw_ops for p in op.outputs}
    for op in raw_ops:
        label = f"{op.schema} ({op.name})"
        is_decoder = op.schema in DECODER_SCHEMAS
        data_in = [p for p in op.inputs if p.arg_name is None]
        image = not is_decoder and any(p.name in image_names for p in data_in)
        for p in op.inputs:
            if p.arg_name is not None and p.name in image_names:
                problems.append(
                    f"{label} takes image data {p.name} as its argument {p.arg_name!r} (on the host)"
                )
        if is_decoder:
            if op.device != "mixed":
                problems.append(f"decoder {label} runs on {op.device!r}, not 'mixed' (nvJPEG)")
        elif image:
            if op.device != "gpu":
                problems.append(f"image operator {label} runs on {op.device!r}")
            else:
                for p in data_in:
                    if p.name in image_names and p.device != "gpu":
                        problems.append(f"image operator {label} reads image {p.name} on {p.device!r}")
        elif op.device == "cpu" and not data_in and (op.shape_elements or 0) > max_host_elements:
            problems.append(
                f"host operator {label} makes {op.shape_elements} values per sample "
                f"(more than {max_host_elements}: image-sized work on the CPU)"
            )
        if op.device in ("gpu", "mixed") and not is_decoder:
            transfers.update(
                p.name for p in data_in if p.device == "gpu" and produced_on.get(p.name) == "cpu"
            )
        ops.append(dataclasses.replace(op, image=image))
    decoders = [op for op in ops if op.schema in DECODER_SCHEMAS]
    if not decoders:
        problems.append("no image decoder in the graph")
    if output_names is not None and len(output_names) != len(pipe_outputs):
        raise ValueError(f"{len(output_names)} output names for {len(pipe_outputs)} pipeline outputs")
    names = output_names or [p.name for p in pipe_outputs]
    outputs = [(Port(n, p.device), p.name in image_names) for n, p in zip(names, pipe_outputs, strict=True)]
    for p, img in outputs:  # named ports
        if img and p.device != "gpu":
            problems.append(f"image output {p.name} leaves the pipeline on {p.device!r}")
    return DeviceReport(ops, outputs, sorted(transfers), problems)


class GraphDef(NamedTuple):
    """One defined (unbuilt) loader graph: a name for messages, the pipeline, its output names."""

    name: str
    pipe: Any
    output_names: list[str]


UNMIX_VARIANTS: dict[str, Any] = {
    "off": None,
    "default": True,
    "per_sample_lambda": {"per_sample_lambda": True},
    "random_partner": {"random_partner": True},
}


def gpu_graph_definitions(shards: Any = None, batch_size: int = 8, crop: int = 224) -> Iterator[GraphDef]:
    """Every GPU graph the loaders can build, defined (not built; no CUDA needed): each recipe x Un-Mix
    variant (:data:`UNMIX_VARIANTS`) x layout for pretraining, and the eval train/val splits per layout.

    ``shards``: a shard directory or :class:`~unmix.pipeline.loaders.ShardFiles`; by default placeholder
    paths (a definition does not open its files).
    """
    from unmix.pipeline.augment import RECIPES
    from unmix.pipeline.loaders import (
        ShardFiles,
        eval_outputs,
        eval_pipeline,
        pretrain_outputs,
        pretrain_pipeline,
    )

    files = shards if shards is not None else ShardFiles(["shard-000000.tar"], ["shard-000000.idx"], 1024)
    common = {"device": "gpu", "num_threads": 1, "device_id": None}
    for channels_last in (False, True):
        layout = "NHWC" if channels_last else "NCHW"
        for recipe in RECIPES:
            for variant, unmix in UNMIX_VARIANTS.items():
                pipe = pretrain_pipeline(
                    files, batch_size, recipe, crop, unmix, channels_last=channels_last, **common
                )
                yield GraphDef(f"pretrain {recipe} unmix={variant} {layout}", pipe, pretrain_outputs(unmix))
        for split in ("train", "val"):
            pipe = eval_pipeline(files, batch_size, split, crop, channels_last=channels_last, **common)
            yield GraphDef(f"eval {split} {layout}", pipe, eval_outputs())
