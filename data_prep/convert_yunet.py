"""Convert an OpenCV-zoo YuNet ONNX file into the .npz that ``lgcn_jax.yunet`` reads, and into the gray
ONNX file that ``lgcn_jax.detectors.YuNetDetector`` runs through OpenCV.

    pip install onnx
    python -m data_prep.convert_yunet lgcn_jax/weights/face_detection_yunet_2026may.onnx lgcn_jax/weights/yunet_2026may.npz
    python -m data_prep.convert_yunet --gray lgcn_jax/weights/face_detection_yunet_2026may.onnx \
        lgcn_jax/weights/face_detection_yunet_2026may_gray.onnx

The gray file takes one channel: the stem convolution's weights summed over the three input channels,
which is the same network for an image whose three channels are equal (a gray image repeated, as the
detector fed it before), to float rounding.  OpenCV runs it 11-14% faster (the 3-channel stem and input
blob cost more than their share of the arithmetic).

Needs ``onnx`` at conversion time only (not a dependency of lgcn_jax).  Conv weights are stored in HWIO
(float32), biases as [O].  A BatchNormalization that directly follows a Conv is
folded into it (the zoo exports already come with BN folded; the code path is
kept for other exports).  Key names:
    backbone.model0.conv1.{w,b}                 3x3 stride-2 stem conv
    <unit>.pw.{w,b} / <unit>.dw.{w,b}           ConvDPUnit: 1x1 conv, 3x3 depthwise
with <unit> = backbone.modelK.convJ, neck.lateral_convs.K,
bbox_head.multi_level_{cls,bbox,obj,kps}.K  (head units: conv1 -> pw, conv2 -> dw).
"""
import sys
import hashlib

import numpy as np


def _onnx():
    """The onnx package and its numpy_helper, or an exit that says how to install it."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise SystemExit("converting needs the onnx package: pip install onnx") from e
    return onnx, numpy_helper


def _attrs(node):
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def convert(onnx_path, out_path):
    onnx, numpy_helper = _onnx()
    model = onnx.load(onnx_path)
    g = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    out = {}
    prev_pw_unit = None
    for n in g.node:
        if n.op_type != "Conv":
            continue
        a = _attrs(n)
        w = init[n.input[1]].astype(np.float32)
        b = init[n.input[2]].astype(np.float32) if len(n.input) > 2 else np.zeros(w.shape[0], np.float32)
        # fold a following BatchNormalization, if any
        nxt = consumers.get(n.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "BatchNormalization":
            bn = nxt[0]
            gamma, beta, mean, var = (init[x].astype(np.float64) for x in bn.input[1:5])
            eps = _attrs(bn).get("epsilon", 1e-5)
            s = gamma / np.sqrt(var + eps)
            w = (w * s[:, None, None, None]).astype(np.float32)
            b = ((b - mean) * s + beta).astype(np.float32)
        assert a.get("dilations", [1, 1]) == [1, 1]
        k = tuple(a["kernel_shape"])
        group = a.get("group", 1)
        wname = n.input[1]
        if wname.endswith(".conv1.weight"):          # named 1x1 (pointwise) conv
            unit, kind = wname[: -len(".conv1.weight")], "pw"
            prev_pw_unit = unit
        elif wname.endswith(".conv2.weight"):        # head 3x3 depthwise conv
            unit, kind = wname[: -len(".conv2.weight")], "dw"
        elif prev_pw_unit is None:                   # numbered, first conv: stem
            unit, kind = "backbone.model0.conv1", None
        else:                                        # numbered (BN-fused) depthwise after a pw
            unit, kind = prev_pw_unit, "dw"
        if kind == "pw":
            assert k == (1, 1) and group == 1 and a.get("strides", [1, 1]) == [1, 1], n.name
        elif kind == "dw":
            assert k == (3, 3) and group == w.shape[0] and w.shape[1] == 1, n.name
            assert a["pads"] == [1, 1, 1, 1] and a.get("strides", [1, 1]) == [1, 1], n.name
        else:
            assert k == (3, 3) and a["strides"] == [2, 2] and a["pads"] == [1, 1, 1, 1], n.name
        key = unit if kind is None else f"{unit}.{kind}"
        assert key + ".w" not in out, key
        out[key + ".w"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        out[key + ".b"] = b
    np.savez_compressed(out_path, **out)
    n_par = sum(v.size for v in out.values())
    sha = hashlib.sha256(open(onnx_path, "rb").read()).hexdigest()
    print(f"{len(out)//2} convs, {n_par} parameters -> {out_path} (onnx sha256 {sha})")
    return out


def gray_model(onnx_path):
    """The YuNet ONNX model of ``onnx_path`` for one input channel (an ``onnx.ModelProto``)."""
    onnx, numpy_helper = _onnx()
    model = onnx.load(onnx_path)
    g = model.graph
    (inp,) = g.input
    stem = next(n for n in g.node if n.op_type == "Conv")
    assert stem.input[0] == inp.name, "the first convolution must read the input"
    (w,) = [t for t in g.initializer if t.name == stem.input[1]]
    weights = numpy_helper.to_array(w)
    assert weights.ndim == 4 and weights.shape[1] == 3 and inp.type.tensor_type.shape.dim[1].dim_value == 3, weights.shape
    w.CopyFrom(numpy_helper.from_array(weights.sum(axis=1, keepdims=True, dtype=np.float32), w.name))
    inp.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.checker.check_model(model)
    return model


def write_gray(onnx_path, out_path):
    onnx, _ = _onnx()
    onnx.save(gray_model(onnx_path), out_path)
    sha = hashlib.sha256(open(out_path, "rb").read()).hexdigest()
    print(f"{onnx_path} -> {out_path}: one input channel (sha256 {sha})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--gray":
        write_gray(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        convert(sys.argv[1], sys.argv[2])
    else:
        sys.exit("usage: python -m data_prep.convert_yunet YUNET.onnx OUT.npz | --gray YUNET.onnx OUT.onnx   (needs `pip install onnx`)")
