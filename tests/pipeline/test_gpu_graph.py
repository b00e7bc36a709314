"""The GPU graphs of the loaders, defined and checked without CUDA.

``pretrain_pipeline`` / ``eval_pipeline`` are what the loaders build; with ``device="gpu"`` and
``device_id=None`` they are defined and serialized on a machine without a GPU, and
``graph_check.device_report`` reads the operators' devices from the serialized protobuf.
"""

from __future__ import annotations

import pytest
from nvidia.dali import fn, pipeline_def, types

from unmix.pipeline import loaders
from unmix.pipeline.graph_check import DECODER_SCHEMAS, device_report, parse_pipeline
from unmix.pipeline.loaders import eval_outputs, eval_pipeline, pretrain_outputs, pretrain_pipeline

CROP = 32
UNMIX = {
    "off": None,
    "default": True,
    "per_sample_lambda": {"per_sample_lambda": True},
    "random_partner": {"random_partner": True},
}
# what may run on the host: the reader, scalar draws and their arithmetic (box, lambda, blur kernel),
# the conditionals' split/merge of those scalars, and the label / key bytes
HOST_SCHEMAS = {
    "readers__Webdataset",
    "random__Uniform",
    "random__CoinFlip",
    "random__Beta",
    "BatchPermutation",
    "PermuteBatch",
    "_ArithmeticGenericOp",
    "Cast",
    "Stack",
    "Constant",
    "Slice",
    "Reshape",
    "reductions__Sum",
    "_conditional__Split",
    "_conditional__Merge",
    "_conditional__Not",
    "_conditional__Validate",
    "Pad",
    "GetProperty",
}
IMAGES = {"view1", "view2", "mixed", "image"}


def _check_gpu_graph(pipe, names: list[str], mixing: bool) -> None:
    report = device_report(pipe, names)
    assert report.ok, str(report)
    (decoder,) = report.decoders
    assert decoder.device == "mixed" and all(p.device == "gpu" for p in decoder.outputs)
    image_ops = [op for op in report.ops if op.image]
    assert image_ops and all(op.device == "gpu" for op in image_ops)
    schemas = {op.schema for op in image_ops}
    resample = "Resize" if "Resize" in schemas else "RandomResizedCrop"  # eval val / the random crops
    assert {resample, "CropMirrorNormalize"} <= schemas
    assert ("MultiPaste" in schemas) == mixing
    host = {op.schema for op in report.ops if op.device == "cpu"}
    assert host <= HOST_SCHEMAS, f"unexpected host operators {host - HOST_SCHEMAS}"
    for port, image in report.outputs:
        assert image == (port.name in IMAGES), port
        assert port.device == ("gpu" if image else "cpu"), port
    # the only host tensor a GPU operator reads as data is the mixup weight (one float per sample)
    assert len(report.transfers) == (1 if mixing else 0), report.transfers
    # the parser agrees with DALI's own operator specs
    by_name = {op.name: op.spec for op in pipe._ops}
    assert {op.name for op in report.ops} == set(by_name)
    for op in report.ops:
        spec = by_name[op.name]
        assert [(p.name, p.device) for p in op.outputs] == [
            (spec.OutputName(i), spec.OutputDevice(i)) for i in range(spec.NumOutput())
        ]
        assert [(p.name, p.device) for p in op.inputs] == [
            (spec.InputName(i), spec.InputDevice(i)) for i in range(spec.NumInput())
        ]


@pytest.mark.parametrize("unmix", list(UNMIX))
@pytest.mark.parametrize("recipe", ["moco_v2", "moco_v1", "byol"])
def test_pretrain_gpu_graph(sample_val, recipe, unmix):
    pipe = pretrain_pipeline(
        sample_val, 8, recipe, CROP, UNMIX[unmix], device="gpu", num_threads=1, device_id=None
    )
    _check_gpu_graph(pipe, pretrain_outputs(UNMIX[unmix]), mixing=unmix != "off")


@pytest.mark.parametrize("unmix", ["default", "random_partner"])
def test_pretrain_gpu_graph_channels_last(sample_val, unmix):
    pipe = pretrain_pipeline(
        sample_val, 8, "byol", CROP, UNMIX[unmix], "gpu", num_threads=1, channels_last=True, device_id=None
    )
    _check_gpu_graph(pipe, pretrain_outputs(UNMIX[unmix]), mixing=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("split", ["train", "val"])
def test_eval_gpu_graph(sample_val, split, channels_last):
    pipe = eval_pipeline(
        sample_val,
        8,
        split,
        CROP,
        "gpu",
        num_threads=1,
        with_keys=True,
        channels_last=channels_last,
        device_id=None,
    )
    _check_gpu_graph(pipe, ["image", "label", "key"], mixing=False)
    assert eval_outputs(with_keys=True) == ["image", "cls", "key"]


def test_cpu_variant_of_the_same_graph_fails_the_gpu_check(sample_val):
    pipe = pretrain_pipeline(sample_val, 8, crop=CROP, unmix=True, device="cpu", num_threads=1)
    report = device_report(pipe, pretrain_outputs(True))
    assert not report.ok
    text = "\n".join(report.problems)
    assert "decoder decoders__Image" in text and "'cpu', not 'mixed'" in text
    assert "image operator RandomResizedCrop" in text and "image operator MultiPaste" in text
    assert "image output view1 leaves the pipeline on 'cpu'" in text


def test_a_host_detour_in_the_loader_graph_is_caught(sample_val, monkeypatch):
    real = loaders.two_views

    def two_views_via_host(images, recipe, crop, layout):  # a device slip: view 2 flipped on the CPU
        v1, v2 = real(images, recipe, crop, layout)
        return v1, fn.flip(v2.cpu())

    monkeypatch.setattr(loaders, "two_views", two_views_via_host)
    pipe = pretrain_pipeline(
        sample_val, 8, crop=CROP, unmix=None, device="gpu", num_threads=1, device_id=None
    )
    report = device_report(pipe, pretrain_outputs(None))
    assert [p for p in report.problems if "Flip" in p and "runs on 'cpu'" in p], report.problems
    assert "image output view2 leaves the pipeline on 'cpu'" in report.problems


def _tiny(kind: str):
    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        jpegs = fn.constant(idata=[255, 216, 255], shape=[3], dtype=types.UINT8, device="cpu")
        x = fn.resize(
            fn.decoders.image(jpegs, device="cpu" if kind == "cpu_decoder" else "mixed"), size=[8, 8]
        )
        if kind == "host_op":
            x = fn.flip(x.cpu())
        elif kind == "host_mask":  # image-sized noise drawn on the CPU and copied every batch
            x = x * fn.random.uniform(range=[0.0, 1.0], shape=[32, 32, 3]).gpu()
        elif kind == "image_argument":
            x = fn.flip(x, horizontal=fn.cast(fn.reductions.sum(x.cpu()) > 0, dtype=types.INT32))
        elif kind == "scalar":  # fine: a per-sample scalar draw meets the image on the GPU
            x = x * fn.random.uniform(range=[0.0, 1.0]).gpu()
        return x

    return pipe()


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("cpu_decoder", "not 'mixed'"),
        ("host_op", "image operator Flip"),
        ("host_mask", "makes 3072 values per sample"),
        ("image_argument", "as its argument 'horizontal'"),
        ("scalar", None),
    ],
)
def test_checker_catches_device_mistakes(kind, problem):
    report = device_report(_tiny(kind))
    if problem is None:
        assert report.ok, str(report)
        assert len(report.transfers) == 1
    else:
        assert any(problem in p for p in report.problems), str(report)
        assert "PROBLEM" in str(report)


def test_report_of_serialized_bytes_and_names(sample_val):
    pipe = eval_pipeline(sample_val, 8, "val", CROP, "gpu", num_threads=1, device_id=None)
    data = pipe.serialize()
    ops, outputs = parse_pipeline(data)
    assert [p.device for p in outputs] == ["gpu", "cpu", "cpu"]  # image, label, key (names a bad label)
    assert sum(op.schema in DECODER_SCHEMAS for op in ops) == 1
    report = device_report(data, ["image", "label", "key"])
    assert report.ok and [p.name for p, _ in report.outputs] == ["image", "label", "key"]
    assert "GPU graph: ok" in str(report) and "image (gpu, image)" in str(report)
    with pytest.raises(ValueError, match="4 output names for 3"):
        device_report(data, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="wire type"):
        parse_pipeline(b"\x0f")


def _op_args(pipe, schema: str) -> tuple[str, dict]:
    (op,) = [op for op in parse_pipeline(pipe.serialize())[0] if op.schema == schema]
    return op.device, op.arguments


def test_decoder_options_default_to_dalis_imagenet_example_in_the_gpu_graph(sample_val):
    from unmix.pipeline.decoding import IMAGENET_DEVICE_PADDING, IMAGENET_HOST_PADDING

    for pipe in (
        pretrain_pipeline(sample_val, 8, "moco_v2", CROP, True, device="gpu", num_threads=1, device_id=None),
        eval_pipeline(sample_val, 8, "val", CROP, device="gpu", num_threads=1, device_id=None),
    ):
        device, args = _op_args(pipe, "decoders__Image")
        assert device == "mixed"
        assert args["hw_decoder_load"] == pytest.approx(0.9)
        assert args["device_memory_padding"] == IMAGENET_DEVICE_PADDING == 211_025_920
        assert args["host_memory_padding"] == IMAGENET_HOST_PADDING == 140_544_512
        assert _op_args(pipe, "readers__Webdataset")[1]["dont_use_mmap"] is False


def test_data_keys_reach_the_serialized_gpu_graph(sample_val, monkeypatch):
    """``data.hw_decoder_load`` etc. in the training config -> the loader -> the GPU graph's decoder and
    reader arguments (read back from the serialized protobuf)."""
    from unmix.training import loop
    from unmix.training.config import load_config

    seen = {}
    monkeypatch.setattr(loaders, "build_pretrain_loader", lambda *a, **k: seen.update(k))
    cfg = load_config(
        None,
        [
            f"data.train={sample_val}",
            "data.hw_decoder_load=0.25",
            "data.device_memory_padding=1048576",
            "data.host_memory_padding=0",
            "data.dont_use_mmap=true",
        ],
    )
    loop.build_loader(cfg, 8, 0, 1)
    pipe = pretrain_pipeline(
        sample_val, 8, "moco_v2", CROP, True, "gpu", num_threads=1, device_id=None, decoder=seen["decoder"]
    )
    _, args = _op_args(pipe, "decoders__Image")
    assert args["hw_decoder_load"] == pytest.approx(0.25)
    assert (args["device_memory_padding"], args["host_memory_padding"]) == (1_048_576, 0)
    assert _op_args(pipe, "readers__Webdataset")[1]["dont_use_mmap"] is True


def test_cpu_graph_runs_without_mmap_and_without_the_mixed_decoders_options(sample_val):
    pipe = eval_pipeline(
        sample_val, 4, "val", CROP, device="cpu", num_threads=1, decoder={"dont_use_mmap": True}
    )
    device, args = _op_args(pipe, "decoders__Image")
    assert device == "cpu" and "hw_decoder_load" not in args and "device_memory_padding" not in args
    assert _op_args(pipe, "readers__Webdataset")[1]["dont_use_mmap"] is True
    pipe.build()
    images = pipe.run()[0]
    assert images.as_array().shape == (4, 3, CROP, CROP)


def test_decoder_options_are_validated():
    from unmix.pipeline.decoding import DecoderOptions
    from unmix.training.config import ConfigError, load_config

    with pytest.raises(ValueError, match="hw_decoder_load"):
        DecoderOptions(hw_decoder_load=1.5)
    with pytest.raises(ValueError, match="unknown decoder option"):
        DecoderOptions.resolve({"hw_load": 0.5})
    with pytest.raises(ConfigError, match=r"data.hw_decoder_load: invalid value 1.2; must be in \[0, 1\]"):
        load_config(None, ["data.hw_decoder_load=1.2"])
    with pytest.raises(ConfigError, match="data.host_memory_padding: invalid value -1"):
        load_config(None, ["data.host_memory_padding=-1"])
