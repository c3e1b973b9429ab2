"""A tiny ``antelopev2`` pack: the five insightface file names with small ONNX graphs of the real signatures.

No model can be downloaded here, yet the face-analysis code must be exercised end to end on real
onnxruntime sessions routed by insightface itself. Each graph here has the input/output signature
insightface's ``model_zoo.get_model`` routes on, so the same loading code serves these files and the
published ones:

- ``scrfd_10g_bnkps.onnx``: SCRFD signature (one NCHW input with symbolic height/width, nine rank-2
  outputs: scores, box distances and keypoint distances for strides 8, 16, 32, two anchors each).
  Hand-built, not random: random detectors report thousands of "faces" and take seconds per image.
  It fires on local maxima of fine texture at stride 32 (a blank or uniform image has none), with a box
  size that grows with the texture around the peak and five keypoints laid out like a frontal face inside
  the box, so alignment, "largest face" and keypoint drawing all have something meaningful to work on.
- ``glintr100.onnx``: ArcFace signature (``[N,3,112,112]`` -> ``[N,512]``), a strided convolution, pooling
  and a projection with seeded weights: different crops give different, un-normalised embeddings.
- ``2d106det.onnx`` / ``1k3d68.onnx``: landmark signatures (192x192 input; 212 and 3309 outputs), a fixed
  plausible landmark layout plus a small content-dependent term.
- ``genderage.onnx``: attribute signature (96x96 input, 3 outputs).

The files are deterministic for a seed (same bytes) and about a megabyte in all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNIZER_FILE = "glintr100.onnx"
LANDMARK_2D_FILE = "2d106det.onnx"
LANDMARK_3D_FILE = "1k3d68.onnx"
GENDERAGE_FILE = "genderage.onnx"

# Opset 17 / IR 8: old enough for every onnxruntime (CPU and GPU builds) the project may meet.
_OPSET = 17
_IR_VERSION = 8

# Detector tuning, in units of the normalised input ((x - 127.5) / 128). ``_TEXTURE_*`` place the sigmoid
# so that smooth regions stay far below the 0.5 threshold and detailed ones (eyes, hair, edges) pass it.
_TEXTURE_CENTER = 0.09
_TEXTURE_GAIN = 60.0
_SKIN_MARGIN = 0.06
_SKIN_GAIN = 50.0
_PEAK_WINDOW = 5  # local-maximum window in stride-32 cells: at most a few dozen candidates per image
_SIZE_CENTER = 0.5  # skin fraction of the 3x3 cells around a peak
_SIZE_GAIN = 6.0
_SIZE_MIN = 0.8  # box half-size range, in stride units (x32 px at detector scale)
_SIZE_SPAN = 1.8

# The ArcFace 112x112 template (left eye, right eye, nose, left mouth, right mouth), re-expressed relative to
# the centre of the template square in units of its half-size: the detector places keypoints this way inside
# each box, so ``norm_crop`` maps a detected box almost exactly onto the crop.
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_KPS_UNIT = (_TEMPLATE_112 - 56.0) / 56.0
# Box distances (left, top, right, bottom) per unit of half-size: a little taller than wide, like SCRFD boxes.
_BOX_UNIT = np.array([1.0, 1.05, 1.0, 1.25], dtype=np.float64)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _int_const(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="instantid-tiny-faces"
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


def _anchor_rows(prefix: str, source: str, channels: int, nodes: list[onnx.NodeProto]) -> str:
    """[1, 2*C, h, w] (anchor-major channels) -> [h*w*2, C], rows ordered y, x, anchor as SCRFD emits."""
    nodes.append(helper.make_node("Transpose", [source], [f"{prefix}_nhwc"], perm=[0, 2, 3, 1], name=f"{prefix}_t"))
    nodes.append(
        helper.make_node("Reshape", [f"{prefix}_nhwc", f"shape_{channels}"], [prefix], name=f"{prefix}_reshape")
    )
    return prefix


def build_detector() -> onnx.ModelProto:
    """The SCRFD-signature detector described in the module docstring (no random weights)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [
        # Grey level averaged over 4x4 pixels: everything else runs at 1/4 resolution, hence fast.
        _const("w_rgb4", np.einsum("oc,hw->ochw", np.eye(3), np.full((4, 4), 1.0 / 16.0))),
        _const("w_gray", np.full((1, 3, 1, 1), 1.0 / 3.0)),
        _const("w_chroma", np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]]).reshape(2, 3, 1, 1)),
        _const("w_skin", np.array([[[[_SKIN_GAIN]]]])),
        _const("b_skin", np.array([-_SKIN_GAIN * _SKIN_MARGIN])),
        _int_const("shape_1", [-1, 1]),
        _int_const("shape_4", [-1, 4]),
        _int_const("shape_10", [-1, 10]),
        _const("w_conf", np.array([[[[_TEXTURE_GAIN]]]])),
        _const("b_conf", np.array([-_TEXTURE_GAIN * _TEXTURE_CENTER])),
        _const("w_size_logit", np.array([[[[_SIZE_GAIN]]]])),
        _const("b_size_logit", np.array([-_SIZE_GAIN * _SIZE_CENTER])),
        _const("w_size", np.array([[[[_SIZE_SPAN]]]])),
        _const("b_size", np.array([_SIZE_MIN])),
        # Anchor 0 carries the score, anchor 1 never fires (one candidate per cell).
        _const("w_score2", np.array([1.0, 0.0]).reshape(2, 1, 1, 1)),
        _const("w_box2", np.concatenate([_BOX_UNIT, _BOX_UNIT]).reshape(8, 1, 1, 1)),
        _const("w_kps2", np.concatenate([_KPS_UNIT.ravel(), _KPS_UNIT.ravel()]).reshape(20, 1, 1, 1)),
        # SCRFD's anchor point is the cell's top-left corner: shift boxes and keypoints to the cell centre.
        _const("b_box2", np.tile([-0.5, -0.5, 0.5, 0.5], 2)),
        _const("b_kps2", np.full(20, 0.5)),
        _const("w_zero2", np.zeros((2, 1, 1, 1))),
        _const("w_zero8", np.zeros((8, 1, 1, 1))),
        _const("w_zero20", np.zeros((20, 1, 1, 1))),
    ]
    add = nodes.append
    add(helper.make_node("Conv", ["input.1", "w_rgb4"], ["rgb4"], strides=[4, 4], name="det_rgb4"))
    add(helper.make_node("Conv", ["rgb4", "w_gray"], ["gray"], name="det_gray"))
    # Skin tone: red above green above blue by a margin (min(R-G, G-B) large). Grey, white, saturated
    # red or blue regions fail; faces of every complexion pass.
    add(helper.make_node("Conv", ["rgb4", "w_chroma"], ["chroma"], name="det_chroma"))
    add(helper.make_node("ReduceMin", ["chroma"], ["chroma_min"], axes=[1], keepdims=1, name="det_chroma_min"))
    add(helper.make_node("Conv", ["chroma_min", "w_skin", "b_skin"], ["skin_logit"], name="det_skin_logit"))
    add(helper.make_node("Sigmoid", ["skin_logit"], ["skin"], name="det_skin"))
    add(
        helper.make_node(
            "AveragePool", ["skin"], ["skin_cell"], kernel_shape=[8, 8], strides=[8, 8], name="det_skin_cell"
        )
    )
    # Fine detail along each axis separately; a cell's energy is the weaker of the two, so a straight edge
    # (the zero padding under a landscape photo, a horizon) scores nothing and only blob-like texture counts.
    for axis, kernel, pads in (("x", [1, 5], [0, 2, 0, 2]), ("y", [5, 1], [2, 0, 2, 0])):
        add(
            helper.make_node(
                "AveragePool",
                ["gray"],
                [f"blur_{axis}"],
                kernel_shape=kernel,
                pads=pads,
                count_include_pad=0,
                name=f"det_blur_{axis}",
            )
        )
        add(helper.make_node("Sub", ["gray", f"blur_{axis}"], [f"detail_signed_{axis}"], name=f"det_detail_{axis}"))
        add(helper.make_node("Abs", [f"detail_signed_{axis}"], [f"detail_{axis}"], name=f"det_abs_{axis}"))
        add(
            helper.make_node(
                "AveragePool",
                [f"detail_{axis}"],
                [f"energy_{axis}"],
                kernel_shape=[8, 8],
                strides=[8, 8],
                name=f"det_cell_{axis}",
            )
        )
    add(helper.make_node("Min", ["energy_x", "energy_y"], ["texture"], name="det_texture"))
    add(helper.make_node("Mul", ["texture", "skin_cell"], ["energy"], name="det_energy"))
    # Candidates are the local maxima of texture energy; the score is a sigmoid of the energy itself.
    half = _PEAK_WINDOW // 2
    add(
        helper.make_node(
            "MaxPool",
            ["energy"],
            ["energy_max"],
            kernel_shape=[_PEAK_WINDOW, _PEAK_WINDOW],
            pads=[half, half, half, half],
            name="det_peak_pool",
        )
    )
    add(helper.make_node("Equal", ["energy", "energy_max"], ["is_peak_bool"], name="det_is_peak"))
    add(helper.make_node("Cast", ["is_peak_bool"], ["is_peak"], to=TensorProto.FLOAT, name="det_peak_float"))
    add(helper.make_node("Conv", ["energy", "w_conf", "b_conf"], ["conf_logit"], name="det_conf_logit"))
    add(helper.make_node("Sigmoid", ["conf_logit"], ["conf"], name="det_conf"))
    add(helper.make_node("Mul", ["conf", "is_peak"], ["score32"], name="det_score"))
    # Box half-size from how much skin surrounds the peak (3x3 cells): a bigger skin patch, a bigger face.
    # Independent of the score, so the largest face is not simply the most confident one.
    add(
        helper.make_node(
            "AveragePool",
            ["skin_cell"],
            ["skin_area"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            count_include_pad=0,
            name="det_area",
        )
    )
    add(helper.make_node("Conv", ["skin_area", "w_size_logit", "b_size_logit"], ["size_logit"], name="det_sl"))
    add(helper.make_node("Sigmoid", ["size_logit"], ["size_unit"], name="det_size_sigmoid"))
    add(helper.make_node("Conv", ["size_unit", "w_size", "b_size"], ["size"], name="det_size"))
    add(helper.make_node("Conv", ["score32", "w_score2"], ["score32_a"], name="det_score_anchors"))
    add(helper.make_node("Conv", ["size", "w_box2", "b_box2"], ["box32_a"], name="det_box_anchors"))
    add(helper.make_node("Conv", ["size", "w_kps2", "b_kps2"], ["kps32_a"], name="det_kps_anchors"))
    # Strides 8 and 16 exist for the signature only: constant zero maps of the right sizes.
    add(helper.make_node("AveragePool", ["gray"], ["grid8"], kernel_shape=[2, 2], strides=[2, 2], name="det_g8"))
    add(helper.make_node("AveragePool", ["gray"], ["grid16"], kernel_shape=[4, 4], strides=[4, 4], name="det_g16"))
    for stride in (8, 16):
        for kind, weight in (("score", "w_zero2"), ("box", "w_zero8"), ("kps", "w_zero20")):
            add(helper.make_node("Conv", [f"grid{stride}", weight], [f"{kind}{stride}_a"], name=f"det_{kind}{stride}"))
    outputs: list[str] = []
    for kind, channels in (("score", 1), ("box", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            outputs.append(_anchor_rows(f"{kind}_{stride}", f"{kind}{stride}_a", channels, nodes))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"rows_{name}", width])
            for name, width in zip(outputs, [1] * 3 + [4] * 3 + [10] * 3, strict=True)
        ],
        inits,
    )
    return _model(graph)


def build_recognizer(rng: np.random.Generator) -> onnx.ModelProto:
    """ArcFace signature: [N,3,112,112] in (x - 127.5) / 127.5, [N,512] out, seeded random projection.

    Node names avoid the ``Sub``/``Mul`` prefixes that make insightface assume an MXNet model with
    in-graph normalisation; it therefore normalises inputs itself, like for the published glintr100.
    """
    conv_w = rng.normal(0.0, 1.0 / np.sqrt(3 * 8 * 8), size=(16, 3, 8, 8))
    conv_b = rng.normal(0.0, 0.05, size=(16,))
    proj_w = rng.normal(0.0, 3.0 / np.sqrt(16 * 7 * 7), size=(16 * 7 * 7, 512))
    proj_b = rng.normal(0.0, 0.1, size=(512,))
    nodes = [
        helper.make_node("Conv", ["input.1", "rec_conv_w", "rec_conv_b"], ["feat"], strides=[8, 8], name="rec_conv"),
        helper.make_node("Tanh", ["feat"], ["feat_act"], name="rec_tanh"),
        helper.make_node("AveragePool", ["feat_act"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2], name="rec_pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="rec_flatten"),
        helper.make_node("Gemm", ["flat", "rec_proj_w", "rec_proj_b"], ["683"], name="rec_fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", 512])],
        [
            _const("rec_conv_w", conv_w),
            _const("rec_conv_b", conv_b),
            _const("rec_proj_w", proj_w),
            _const("rec_proj_b", proj_b),
        ],
    )
    return _model(graph)


def _pooled_head(name: str, size: int, bias: np.ndarray, rng: np.random.Generator, scale: float) -> onnx.ModelProto:
    """[N,3,size,size] -> global average -> small seeded linear term + a fixed plausible ``bias``."""
    out = int(bias.shape[0])
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["gap"], name=f"{name}_gap"),
        helper.make_node("Flatten", ["gap"], ["gap_flat"], axis=1, name=f"{name}_flatten"),
        helper.make_node("Gemm", ["gap_flat", f"{name}_w", f"{name}_b"], ["fc1"], name=f"{name}_fc"),
    ]
    graph = helper.make_graph(
        nodes,
        f"tiny_{name}",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", out])],
        [_const(f"{name}_w", rng.normal(0.0, scale, size=(3, out))), _const(f"{name}_b", bias)],
    )
    return _model(graph)


def _landmarks_106() -> np.ndarray:
    """106 2-D points in the crop's [-1, 1] frame: a jaw line, brows, eyes, nose and mouth, face-like."""
    jaw_t = np.linspace(np.pi * 0.05, np.pi * 0.95, 33)
    jaw = np.stack([-0.42 * np.cos(jaw_t), 0.05 + 0.42 * np.sin(jaw_t)], axis=1)
    ring = np.linspace(0.0, 2.0 * np.pi, 10, endpoint=False)
    eye = np.stack([0.09 * np.cos(ring), 0.04 * np.sin(ring)], axis=1)
    brow = np.stack([np.linspace(-0.12, 0.12, 9), np.full(9, -0.2)], axis=1)
    nose = np.stack([np.zeros(15), np.linspace(-0.12, 0.12, 15)], axis=1)
    mouth_t = np.linspace(0.0, 2.0 * np.pi, 20, endpoint=False)
    mouth = np.stack([0.15 * np.cos(mouth_t), 0.25 + 0.05 * np.sin(mouth_t)], axis=1)
    points = np.concatenate(
        [
            jaw,
            brow + np.array([-0.2, 0.0]),
            brow + np.array([0.2, 0.0]),
            eye + np.array([-0.2, -0.08]),
            eye + np.array([0.2, -0.08]),
            nose,
            mouth,
        ]
    )
    assert points.shape == (106, 2)
    return points.ravel()


def _landmarks_68_3d() -> np.ndarray:
    """3309 values: 1035 unused leading rows, then insightface's 68-point mean shape in the crop frame."""
    from insightface.data import get_object  # only here: the mean shape ships with insightface

    mean = np.asarray(get_object("meanshape_68.pkl"), dtype=np.float64)
    values = np.zeros((3309 // 3, 3), dtype=np.float64)
    values[-68:] = mean * 0.6
    return values.ravel()


def write_tiny_antelopev2(directory: Path, seed: int = 0) -> None:
    """Write the five ``antelopev2`` files into ``directory`` (created if needed), same bytes for a seed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    models = {
        DETECTOR_FILE: build_detector(),
        RECOGNIZER_FILE: build_recognizer(rng),
        LANDMARK_2D_FILE: _pooled_head("lmk2d", 192, _landmarks_106(), rng, 0.01),
        LANDMARK_3D_FILE: _pooled_head("lmk3d", 192, _landmarks_68_3d(), rng, 0.01),
        GENDERAGE_FILE: _pooled_head("genderage", 96, np.array([0.0, 0.0, 0.3]), rng, 0.1),
    }
    for name, model in models.items():
        (directory / name).write_bytes(model.SerializeToString())
