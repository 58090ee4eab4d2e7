"""Convert an OpenCV-zoo YuNet ONNX file into the .npz that ``lgcn_jax.yunet`` reads.

    pip install onnx
    python -m data_prep.convert_yunet lgcn_jax/weights/face_detection_yunet_2026may.onnx lgcn_jax/weights/yunet_2026may.npz

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


def _attrs(node):
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def convert(onnx_path, out_path):
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise SystemExit("converting needs the onnx package: pip install onnx") from e
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m data_prep.convert_yunet YUNET.onnx OUT.npz   (needs `pip install onnx`)")
    convert(sys.argv[1], sys.argv[2])
