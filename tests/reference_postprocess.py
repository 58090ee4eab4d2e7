"""A plain NumPy/SciPy reference of the shape model and post-processing, for tests and bench.

Written for clarity, not speed: every shape is aligned with an SVD Kabsch,
the constraints are *all* coordinate orders that hold on the training set
(not a reduction), and each fit builds the weighted least-squares system over
every heatmap pixel, as the algorithm states it, and hands it to
``scipy.optimize.minimize(method="SLSQP")`` in float64.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize


def kabsch(source, target, weights):
    """Rotation angle mapping centred source onto centred target (SVD form), float64."""
    w = weights / weights.sum()
    a = source - (w[:, None] * source).sum(0)
    b = target - (w[:, None] * target).sum(0)
    u, _, vt = np.linalg.svd((a * w[:, None]).T @ b)
    r = vt.T @ np.diag([1.0, np.sign(np.linalg.det(vt.T @ u.T))]) @ u.T
    return np.arctan2(r[1, 0], r[0, 0])


def rot(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def build_model(landmarks, image_size, num_components=12, iterations=3):
    shapes = np.asarray(landmarks, np.float64)
    c = np.full(2, (image_size - 1) / 2.0)
    aligned, ref = shapes, shapes.mean(0)
    for _ in range(iterations):
        aligned = np.stack([(s - c) @ rot(kabsch(s, ref, np.ones(len(s)))).T + c for s in shapes])
        ref = aligned.mean(0)
    mean = aligned.mean(0)
    n = len(shapes)
    _, sv, vt = np.linalg.svd((aligned - mean).reshape(n, -1), full_matrices=False)
    comps = vt[:num_components].reshape(num_components, -1, 2) * (sv[:num_components] / np.sqrt(n - 1))[:, None, None]
    flat = aligned.reshape(n, -1)
    pairs = []
    for axis in range(2):
        idx = np.arange(axis, flat.shape[1], 2)
        for i in idx:
            for j in idx:
                if i != j and np.all(flat[:, i] < flat[:, j]):
                    pairs.append((i, j))
    return {"mean": mean, "components": comps, "pairs": np.array(pairs), "image_size": image_size}


def log_parabola(left, mid, right):
    if mid <= 0:
        return 0.0
    floor = mid * 1e-6
    l, m, r = np.log(max(left, floor)), np.log(mid), np.log(max(right, floor))
    curv = l - 2 * m + r
    return float(np.clip(0.5 * (l - r) / curv, -0.5, 0.5)) if curv < 0 else 0.0


def refine(hm, iy, ix, radius=1):
    h, w = hm.shape
    radius = min(radius, (h - 1) // 2, (w - 1) // 2)
    cy, cx = min(max(iy, radius), h - 1 - radius), min(max(ix, radius), w - 1 - radius)
    win = hm[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
    if radius > 1 and win.max() > 0:
        # log(value) = a + b x + c y + d x^2 + e xy + f y^2 over the window, moved inside the map.
        ys, xs = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        logs = np.log(np.maximum(win, win.max() * 1e-6)).ravel()
        design = np.stack([np.ones(xs.size), xs.ravel(), ys.ravel(), xs.ravel() ** 2, (xs * ys).ravel(), ys.ravel() ** 2], 1)
        _, b, c, d, e, f = np.linalg.lstsq(design, logs, rcond=None)[0]
        # The stationary point: [2d e; e 2f] [x y]' = -[b c]'.
        if d < 0 and f < 0 and 4 * d * f - e * e > 0:
            x, y = np.linalg.solve([[2 * d, e], [e, 2 * f]], [-b, -c])
            if abs(x) <= radius and abs(y) <= radius:
                return np.array([cx + x, cy + y])
    left = hm[iy, ix - 1] if ix > 0 else hm[iy, ix + 1]
    right = hm[iy, ix + 1] if ix < w - 1 else left
    up = hm[iy - 1, ix] if iy > 0 else hm[iy + 1, ix]
    down = hm[iy + 1, ix] if iy < h - 1 else up
    return np.array([ix + log_parabola(left, hm[iy, ix], right), iy + log_parabola(up, hm[iy, ix], down)])


def value_at(hm, p):
    h, w = hm.shape
    return hm[int(np.clip(np.round(p[1]), 0, h - 1)), int(np.clip(np.round(p[0]), 0, w - 1))]


def rotation_for(heat, points, model, threshold):
    conf = np.array([value_at(heat[:, :, l], points[l]) for l in range(points.shape[0])])
    certain = conf >= threshold
    if certain.sum() < 2:
        certain = np.zeros_like(certain)
        certain[np.argsort(-conf)[: max(4, round(1 / threshold)) + 1]] = True
    return kabsch(model["mean"][certain], points[certain], np.ones(certain.sum()))


def fit(heat, theta, model, num_components, floor, constraints, window_centres=None, half=None):
    h, w, num_l = heat.shape
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    r = rot(theta)
    base = (model["mean"] - c) @ r.T + c
    jac = np.einsum("kld,ed->kle", model["components"][:num_components], r)  # rotated components
    ys, xs = np.mgrid[0:h, 0:w]
    rows, rhs = [], []
    for l in range(num_l):
        wt = np.where(heat[:, :, l] > floor, heat[:, :, l], 0.0)
        if window_centres is not None:
            cx, cy = np.round(window_centres[l])
            wt = wt * ((np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half))
        sel = wt > 0
        wv = wt[sel]
        for d, grid in ((0, xs), (1, ys)):
            # One equation per pixel: w * (model coordinate) = w * (pixel coordinate).
            rows.append(wv[:, None] * jac[:, l, d][None, :])
            rhs.append(wv * (grid[sel] - base[l, d]))
    a = np.concatenate(rows)
    b = np.concatenate(rhs)
    ata, atb = a.T @ a, a.T @ b
    ata += (1e-6 * np.trace(ata) / num_components + 1e-12) * np.eye(num_components)
    cons = []
    if constraints:
        flat = model["components"][:num_components].reshape(num_components, -1)
        mean = model["mean"].reshape(-1)
        i, j = model["pairs"][:, 0], model["pairs"][:, 1]
        g = flat[:, j].T - flat[:, i].T  # >= -(mean_j - mean_i)
        cons = [{"type": "ineq", "fun": lambda x: g @ x + (mean[j] - mean[i]), "jac": lambda x: g}]
    res = optimize.minimize(lambda x: 0.5 * x @ ata @ x - atb @ x, np.zeros(num_components), jac=lambda x: ata @ x - atb,
                            constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    return base + np.einsum("k,kld->ld", res.x, jac)


def postprocess(heatmaps, model, num_components=12, threshold=0.1, floor=0.01, windows=(20, 7), blend=True, constraints=True,
                peak_fit_radius=8):
    """Landmarks f64[B, L, 2] from heatmaps f[B, H, W, L] (defaults: PostprocessConfig's)."""
    out = []
    for heat in np.asarray(heatmaps, np.float64):
        h, w, num_l = heat.shape
        fit_radius = max(1, round(peak_fit_radius * h / 96)) if peak_fit_radius > 1 else 1
        init = []
        for l in range(num_l):
            iy, ix = np.unravel_index(np.argmax(heat[:, :, l]), (h, w))
            init.append(refine(heat[:, :, l], iy, ix, fit_radius))
        init = np.array(init)
        theta = rotation_for(heat, init, model, threshold)
        pts = fit(heat, theta, model, num_components, floor, constraints)
        if windows:
            theta = rotation_for(heat, pts, model, threshold)
            for half in windows:
                half = max(1, round(half * h / 96))
                pts = fit(heat, theta, model, num_components, floor, constraints, pts, half)
        if blend:
            final = []
            for l in range(num_l):
                hm = heat[:, :, l]
                peaks = (hm >= ndimage.maximum_filter(hm, 3, mode="nearest")) & (hm > ndimage.minimum_filter(hm, 3, mode="nearest"))
                py, px = np.nonzero(peaks)
                if len(py) == 0:
                    final.append(pts[l])
                    continue
                k = np.argmin((px - pts[l, 0]) ** 2 + (py - pts[l, 1]) ** 2)
                v = float(np.clip(hm[py[k], px[k]], 0, 1))
                final.append((1 - v) * pts[l] + v * refine(hm, py[k], px[k], fit_radius))
            pts = np.array(final)
        out.append(pts)
    return np.stack(out)
