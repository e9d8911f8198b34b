"""The frontier study's methods and grids (experiments/README.md, `frontier.py`), and the merge
config of each point for the toolkit's engine. Every value here is ours.

A point: {"name", "method" (family shown in tables), "engine" ("safepatch" |
"task_arithmetic" | "ties" | "backbone"), "params", "se" ("npo" | "ga"), "saliency"
("responses" | "questions")}. `grid()` returns them in run order: one point of every method
first (question saliency after three more SafePatching points), so a short chunk screens
each method, then the rest.
"""
from __future__ import annotations

SP_AB = [(0.05, 0.05), (0.1, 0.1), (0.1, 0.3), (0.3, 0.3)]
SP_ALPHA = [0.5, 1.0]
SP_BETA = [1.0, 2.0]
RETENTION = [(order, p) for order in ("after_selection", "before_selection") for p in (0.5, 0.3)]
QUESTION_AB = [(0.1, 0.1), (0.1, 0.3), (0.05, 0.05)]
GA_AB = [(0.1, 0.1), (0.1, 0.3)]
OSM_W = [0.5, 0.25, 1.0]
SE_W = [0.5, 1.0, 0.75]
TA_W = [(1.0, 0.5), (1.0, 1.0), (1.0, 0.25), (0.75, 0.5)]
TIES = [(0.1, 1.0, 1.0), (0.3, 1.0, 1.0), (0.1, 1.0, 0.5), (0.3, 1.0, 0.5)]  # density, w_SE, w_OSM
INTERSECTION = [0.1, 0.3]

FAMILIES = ["backbone", "safepatch", "safepatch_questions", "safepatch_ga", "osm_scale",
            "se_scale", "task_arithmetic", "ties", "intersection"]


def _g(v: float) -> str:
    return f"{v:g}"


def sp_point(a: float, b: float, alpha: float = 1.0, beta: float = 1.0, p: float = 1.0,
             order: str = "after_selection", saliency: str = "responses", se: str = "npo",
             mask_mode: str = "difference") -> dict:
    """A SafePatching point (mask_mode difference) or the intersection ablation."""
    if p < 1 and order == "before_selection" and a > p:
        raise ValueError(f"before_selection needs a <= p, got a={a}, p={p}")
    fam = ("intersection" if mask_mode == "intersection" else
           "safepatch_ga" if se == "ga" else
           "safepatch_questions" if saliency == "questions" else "safepatch")
    name = (f"{'ix' if mask_mode == 'intersection' else 'sp'}_a{_g(a)}_b{_g(b)}"
            f"_al{_g(alpha)}_be{_g(beta)}")
    if p < 1:
        name += f"_p{_g(p)}_{'before' if order == 'before_selection' else 'after'}"
    if saliency == "questions":
        name += "_q"
    if se != "npo":
        name += f"_{se}"
    return {"name": name, "method": fam, "engine": "safepatch", "se": se, "saliency": saliency,
            "params": {"a": a, "b": b, "alpha": alpha, "beta": beta, "p": p, "order": order,
                       "mask_mode": mask_mode}}


def scale_point(which: str, w: float) -> dict:
    """θ + w·P_X through task arithmetic with one model (no normalisation: exactly w·delta)."""
    return {"name": f"{which}_w{_g(w)}", "method": f"{which}_scale", "engine": "task_arithmetic",
            "se": "npo", "saliency": None,
            "params": {"w_se": w if which == "se" else 0.0, "w_osm": w if which == "osm" else 0.0}}


def ta_point(w_se: float, w_osm: float) -> dict:
    return {"name": f"ta_se{_g(w_se)}_osm{_g(w_osm)}", "method": "task_arithmetic",
            "engine": "task_arithmetic", "se": "npo", "saliency": None,
            "params": {"w_se": w_se, "w_osm": w_osm}}


def ties_point(density: float, w_se: float, w_osm: float) -> dict:
    return {"name": f"ties_d{_g(density)}_se{_g(w_se)}_osm{_g(w_osm)}", "method": "ties",
            "engine": "ties", "se": "npo", "saliency": None,
            "params": {"density": density, "w_se": w_se, "w_osm": w_osm}}


def default_point() -> dict:
    """The toolkit's default SafePatching configuration (merge/defaults.py; SNIP on responses,
    the score default) as a grid point, so the study reports what a user gets unconfigured."""
    from safepatch_merge.merge import defaults as d

    return sp_point(d.TOP_RATE_SE, d.TOP_RATE_OSM, d.ALPHA, d.BETA, d.RETENTION,
                    d.RETENTION_ORDER, mask_mode=d.MASK_MODE)


BACKBONE = {"name": "backbone", "method": "backbone", "engine": "backbone", "se": None,
            "saliency": None, "params": {}}


def grid(with_ga: bool = True) -> list[dict]:
    """Every point of one seed in run order (backbone first)."""
    sp = [sp_point(a, b, al, be) for (a, b) in SP_AB for al in SP_ALPHA for be in SP_BETA]
    ret = [sp_point(0.1, 0.1, 1.0, 1.0, p, order) for order, p in RETENTION]
    q = [sp_point(a, b, saliency="questions") for a, b in QUESTION_AB]
    ga = [sp_point(a, b, se="ga") for a, b in GA_AB] if with_ga else []
    osm = [scale_point("osm", w) for w in OSM_W]
    se = [scale_point("se", w) for w in SE_W]
    ta = [ta_point(*w) for w in TA_W]
    ties = [ties_point(*t) for t in TIES]
    ix = [sp_point(r, r, mask_mode="intersection") for r in INTERSECTION]
    default = default_point()
    before = sp_point(0.1, 0.1, p=0.5, order="before_selection")
    first = [BACKBONE, default, osm[0], se[0], ta[0], ix[0], before, osm[1], se[1], ta[1],
             ties[0]]
    rest_sp = [sp_point(0.05, 0.05), sp_point(0.1, 0.3), sp_point(0.3, 0.3)]
    # question saliency needs two more score directories (~2 x 5 min on 2 cores): after the
    # response-saliency points that need none
    ordered = first + rest_sp + [q[0]] + osm[2:] + se[2:] + ta[2:] + ties[1:] + ix[1:]
    for p in sp + ret + q + ga:
        ordered.append(p)
    out, seen = [], set()
    for p in ordered:
        if p["name"] not in seen:
            seen.add(p["name"])
            out.append(p)
    return out


def merge_config(pt: dict, backbone: str, se: str, osm: str, scores: dict, seed: int) -> dict:
    """The engine config of one point. scores: {"se": dir, "osm": dir} of the point's saliency
    (SafePatching and intersection only); seed: the retention draws' seed."""
    pr = pt["params"]
    out = {"dtype": "float32", "model_card": False}
    if pt["engine"] == "safepatch":
        return {"method": "safepatch", "backbone": backbone, "patches": {"se": se, "osm": osm},
                "scores": {"se": scores["se"], "osm": scores["osm"]},
                "parameters": {"top_rate_se": pr["a"], "top_rate_osm": pr["b"],
                               "alpha": pr["alpha"], "beta": pr["beta"], "retention": pr["p"],
                               "retention_order": pr["order"], "rescale": False,
                               "mask_mode": pr["mask_mode"], "seed": seed},
                "output": out}
    models = [(se, pr["w_se"]), (osm, pr["w_osm"])]
    entries = []
    for path, w in models:
        if w == 0:
            continue  # θ + w·P_X: the other patch is left out, not weighted 0
        par = {"weight": w}
        if pt["engine"] == "ties":
            par["density"] = pr["density"]
        entries.append({"model": path, "parameters": par})
    return {"method": pt["engine"], "backbone": backbone, "models": entries, "seed": seed,
            "output": out}
