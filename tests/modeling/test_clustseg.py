"""ClustSeg (Liang et al., ICML 2023) on the CPU.

* Recurrent cross-attention (Eq. 10-11): with identity projections it is T steps of soft k-means
  computed by hand; projections shared over iterations, K and V computed once; the k-means and
  vanilla (Eq. 5) variants; multi-head = independent clustering per channel group.
* Dreamy-start (Eq. 7-9): FIFO memory banks, their checkpoint round trip, classes absent from the
  bank, grid seeds, superpixel-count errors.
* Decoder structure: six layers, two per level (coarse to fine), supervised E-steps.
* A training step and an evaluation for every synthetic ClustSeg config on ``tiny_synthetic``.
* Config checks at build time: the superpixel numbers (named keys), the superpixel task versus
  TEST.SUPERPIXEL_ON, and the one deep-supervision switch (MODEL.MASK_CLS.DEEP_SUPERVISION).
"""

import io
import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper, build_test_loader
from seg_methods.data.datasets.superpixel import register_synthetic_superpixel
from seg_methods.evaluation import build_evaluator
from seg_methods.config.clustseg import superpixel_on
from seg_methods.evaluation.build import model_output_flags
from seg_methods.modeling.criterion.superpixel import SuperpixelCriterion
from seg_methods.modeling.superpixel_counts import check_num_superpixels
from seg_methods.modeling.transformer_decoder.clustseg_layers import (
    DreamyStart,
    RecurrentCrossAttention,
    grid_seed_coords,
)


# --------------------------------------------------------------------------- recurrent layer
def _identity_layer(d, heads=1, T=3, **kw):
    layer = RecurrentCrossAttention(d, heads, num_iterations=T, scaled=False, impl="pytorch", **kw)
    with torch.no_grad():
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    return layer


def _close(t, nested, atol=1e-6):
    """Tensor ``t`` equals the nested Python list ``nested`` (computed by hand) up to ``atol``."""
    return torch.allclose(t.double(), torch.tensor(nested, dtype=torch.float64), atol=atol)


# 6 pixels and 2 centres in 2-D
X = [[1.0, 0.0], [0.9, 0.2], [0.8, -0.1], [0.0, 1.0], [-0.2, 0.7], [0.1, 0.9]]
C0 = [[0.5, 0.5], [0.3, -0.2]]


def _soft_kmeans_by_hand(centres, points, steps, mean=True):
    """Plain-Python EM: softmax over clusters of <c_k, x_n>, then (weighted mean | sum)."""
    history, logits_history = [], []
    for _ in range(steps):
        logits = [[sum(c[j] * x[j] for j in range(2)) for x in points] for c in centres]
        resp = []
        for n in range(len(points)):
            e = [math.exp(logits[k][n]) for k in range(len(centres))]
            resp.append([v / sum(e) for v in e])
        new = []
        for k in range(len(centres)):
            w = [resp[n][k] for n in range(len(points))]
            s = [sum(w[n] * points[n][j] for n in range(len(points))) for j in range(2)]
            new.append([v / sum(w) for v in s] if mean else s)
        centres = new
        history.append(centres)
        logits_history.append(logits)
    return history, logits_history


@pytest.mark.parametrize("T", [1, 3, 5])
def test_identity_projections_reproduce_soft_kmeans_by_hand(T):
    layer = _identity_layer(2, T=T)
    centres, logits = layer.cluster(torch.tensor([C0]), torch.tensor([X]))
    want, want_logits = _soft_kmeans_by_hand(C0, X, T)
    assert len(centres) == T and len(logits) == T
    for t in range(T):
        assert _close(centres[t][0], want[t])
        assert _close(logits[t][0], want_logits[t])
    # the layer output is LayerNorm(c0 + c_T) (Eq. 11 residual, post-norm)
    out, states, _ = layer(torch.tensor([C0]), torch.tensor([X]))
    ref = torch.nn.functional.layer_norm(torch.tensor([C0]) + torch.tensor([want[-1]]), (2,))
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(states[0], torch.tensor([C0]))


def test_sum_m_step_is_eq10_as_printed():
    layer = _identity_layer(2, T=2, m_step="sum")
    centres, _ = layer.cluster(torch.tensor([C0]), torch.tensor([X]))
    want, _ = _soft_kmeans_by_hand(C0, X, 2, mean=False)
    assert _close(centres[1][0], want[1], atol=1e-5)


def test_kmeans_and_vanilla_variants_by_hand():
    x, c0 = torch.tensor([X]), torch.tensor([C0])
    km = _identity_layer(2, T=1, mode="kmeans")
    # centres on the axes: pixels 0-2 are closer to e_x, pixels 3-5 to e_y (hard argmax)
    (c,), (lg,) = km.cluster(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), x)
    assert _close(c[0, 0], [(1.0 + 0.9 + 0.8) / 3, (0.0 + 0.2 - 0.1) / 3])
    assert _close(c[0, 1], [(0.0 - 0.2 + 0.1) / 3, (1.0 + 0.7 + 0.9) / 3])
    # an empty cluster (no pixel prefers it) gets a zero update
    (c,), _ = km.cluster(torch.tensor([[[1.0, 1.0], [-5.0, -5.0]]]), x)
    assert c[0, 1].tolist() == [0.0, 0.0]
    van = _identity_layer(2, T=1, mode="vanilla")
    (c,), _ = van.cluster(c0, x)
    attn = (c0[0] @ x[0].t()).softmax(-1)  # Eq. 5: softmax over the pixels
    assert torch.allclose(c[0], attn @ x[0], atol=1e-6)
    _, _, logits = van(c0, x)
    assert logits == [None]  # vanilla has no E-step to supervise


def test_multi_head_is_independent_clustering_per_channel_group():
    pts = torch.tensor([X])
    x4 = torch.cat([pts, pts.flip(1)], -1)  # (1, 6, 4): heads see different pixel orders
    c4 = torch.tensor([[C0[0] + C0[1], C0[1] + C0[0]]])  # (1, 2, 4)
    layer = _identity_layer(4, heads=2, T=2)
    centres, logits = layer.cluster(c4, x4)
    h0, l0 = _soft_kmeans_by_hand([C0[0], C0[1]], X, 2)
    h1, l1 = _soft_kmeans_by_hand([C0[1], C0[0]], X[::-1], 2)
    assert _close(centres[1][0, :, :2], h0[1])
    assert _close(centres[1][0, :, 2:], h1[1])
    # supervised logits are the head average
    avg = (torch.tensor(l0[1]) + torch.tensor(l1[1])) / 2  # (pixel order as each head sees it)
    assert torch.allclose(logits[1][0], avg, atol=1e-6)


def test_projections_shared_and_keys_values_computed_once():
    torch.manual_seed(0)
    calls = {"q": 0, "k": 0, "v": 0}
    counts = {}
    for T in (1, 4):
        layer = RecurrentCrossAttention(8, 2, num_iterations=T, impl="pytorch")
        counts[T] = sum(p.numel() for p in layer.parameters())
        for name in calls:
            getattr(layer, f"{name}_proj").register_forward_hook(
                lambda m, i, o, n=name: calls.__setitem__(n, calls[n] + 1)
            )
        for name in calls:
            calls[name] = 0
        layer(torch.randn(2, 3, 8), torch.randn(2, 10, 8))
        assert calls == {"q": T, "k": 1, "v": 1}
    assert counts[1] == counts[4]  # recurrence adds no parameters


@pytest.mark.parametrize("mode", ["recurrent", "kmeans"])
def test_compiled_ops_match_the_reference_inside_the_layer(mode):
    from seg_methods.utils.ext import has_op

    if not (has_op("soft_cluster_forward") and has_op("hard_cluster_argmax")):
        pytest.skip("seg_methods._C clustering ops not built")
    torch.manual_seed(0)
    ext = RecurrentCrossAttention(16, 4, num_iterations=3, mode=mode, impl="ext").double()
    ref = RecurrentCrossAttention(16, 4, num_iterations=3, mode=mode, impl="pytorch").double()
    ref.load_state_dict(ext.state_dict())
    t = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 30, 16, dtype=torch.float64)
    out_e, _, lg_e = ext(t, m)
    out_r, _, lg_r = ref(t, m)
    assert torch.allclose(out_e, out_r, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(lg_e, lg_r))
    (g_e,) = torch.autograd.grad(out_e.sum() + sum(x.sum() for x in lg_e), t)
    (g_r,) = torch.autograd.grad(out_r.sum() + sum(x.sum() for x in lg_r), t)
    assert torch.allclose(g_e, g_r, atol=1e-10)


def test_recurrent_layer_gradients_flow():
    torch.manual_seed(0)
    layer = RecurrentCrossAttention(8, 2, num_iterations=3)
    tgt = torch.randn(2, 3, 8, requires_grad=True)
    mem = torch.randn(2, 10, 8, requires_grad=True)
    out, _, logits = layer(tgt, mem)
    (out.sum() + sum(lg.sum() for lg in logits)).backward()
    assert tgt.grad.abs().sum() > 0 and mem.grad.abs().sum() > 0
    assert layer.q_proj.weight.grad.abs().sum() > 0


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="mode"):
        RecurrentCrossAttention(8, 2, mode="gumbel")
    with pytest.raises(ValueError, match="num_iterations"):
        RecurrentCrossAttention(8, 2, num_iterations=0)
    with pytest.raises(ValueError, match="divisible"):
        RecurrentCrossAttention(8, 3)


# --------------------------------------------------------------------------- dreamy-start
def _dreamy(**kw):
    args = dict(
        hidden_dim=2,
        num_thing_queries=0,
        semantic_classes=[1, 3],
        num_classes=4,
        memory_size=4,
        memory_samples_per_image=8,
    )
    args.update(kw)
    return DreamyStart(**args)


def test_memory_bank_is_fifo():
    ds = _dreamy()
    ds.push(0, torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert ds.memory_count.tolist() == [3, 0] and ds.memory_ptr.tolist() == [3, 0]
    assert ds.class_centres()[0].tolist() == [2.0, 0.0]
    ds.push(0, torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # 1 and 2 are evicted first
    assert ds.memory[0, :, 0].tolist() == [5.0, 6.0, 3.0, 4.0]
    assert ds.memory_count.tolist() == [4, 0] and ds.memory_ptr.tolist() == [2, 0]
    assert ds.class_centres()[0].tolist() == [4.5, 0.0]  # mean of 3, 4, 5, 6
    ds.push(0, torch.arange(12.0).view(6, 2))  # more than the queue: the last 4 are kept
    assert sorted(ds.memory[0, :, 0].tolist()) == [4.0, 6.0, 8.0, 10.0]


def test_update_memory_pushes_pixels_of_bank_classes_only():
    ds = _dreamy()
    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1,2,2,2)
    # 4x4 targets: class 3 covers the top-left 2x2 block (-> feature pixel (0, 0)); class 0 (no
    # bank) the rest; class 1 a single input pixel (area 1/4 of a cell: below 0.5 -> skipped)
    m3 = torch.zeros(4, 4, dtype=torch.bool)
    m3[:2, :2] = True
    m1 = torch.zeros(4, 4, dtype=torch.bool)
    m1[3, 3] = True
    m0 = ~(m3 | m1)
    ds.update_memory(
        feats, [{"labels": torch.tensor([3, 0, 1]), "masks": torch.stack([m3, m0, m1])}]
    )
    assert ds.memory_count.tolist() == [0, 1]  # slots: class 1 -> 0, class 3 -> 1
    assert ds.memory[1, 0].tolist() == [1.0, 10.0]


def test_memory_bank_checkpoint_round_trip_and_absent_classes():
    torch.manual_seed(0)
    ds = _dreamy(hidden_dim=4)
    # nothing seen yet: both classes use the learned fallback through the FFN (Eq. 7)
    assert torch.equal(ds.class_centres(), ds.memory_fallback)
    q, qpos = ds(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert q.shape == (2, 2, 4) and torch.isfinite(q).all()
    assert torch.allclose(q[0], ds.stuff_ffn(ds.memory_fallback))
    ds.push(1, torch.ones(3, 4))
    centres = ds.class_centres()
    assert centres[1].tolist() == [1.0] * 4 and torch.equal(centres[0], ds.memory_fallback[0])

    buf = io.BytesIO()
    torch.save(ds.state_dict(), buf)
    assert {"memory", "memory_ptr", "memory_count"} <= set(ds.state_dict())
    fresh = _dreamy(hidden_dim=4)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.memory, ds.memory)
    assert torch.equal(fresh.memory_count, ds.memory_count)
    assert torch.equal(fresh.class_centres(), ds.class_centres())
    fresh.push(1, torch.zeros(1, 4))  # FIFO state continues where it stopped
    assert fresh.memory_ptr.tolist() == [0, 0] and fresh.memory_count.tolist() == [0, 4]


def test_grid_seeds_are_exact_count_spread_and_inside():
    for num, h, w in [(4, 8, 8), (75, 16, 16), (50, 12, 20), (7, 3, 5)]:
        c = grid_seed_coords(num, h, w)
        assert c.shape == (num, 2)
        assert (c > -1).all() and (c < 1).all()
        assert len({tuple(p) for p in c.tolist()}) == num
    # a full grid: 2 x 2 cell centres
    assert grid_seed_coords(4, 8, 8).tolist() == [
        [-0.5, -0.5],
        [0.5, -0.5],
        [-0.5, 0.5],
        [0.5, 0.5],
    ]


def test_superpixel_count_errors():
    check_num_superpixels(50, 64)
    check_num_superpixels(2500, 10_000)
    with pytest.raises(ValueError, match=r"\[50, 2500\]"):
        check_num_superpixels(49, 10_000)
    with pytest.raises(ValueError, match=r"\[50, 2500\]"):
        check_num_superpixels(2501, 10_000)
    with pytest.raises(ValueError, match="more clusters than pixels"):
        check_num_superpixels(100, 64)
    ds = DreamyStart(
        hidden_dim=4, num_thing_queries=0, semantic_classes=[], num_classes=1, superpixel=True
    )
    f = torch.randn(1, 4, 10, 10)
    q, qpos = ds(f, f, f, torch.zeros_like(f), num_superpixels=60)
    assert q.shape == (1, 60, 4) and qpos.shape == (1, 60, 4)
    with pytest.raises(ValueError, match="more clusters than pixels"):
        ds(f, f, f, f, num_superpixels=101)


def test_scene_adaptive_topk_seeds_take_highest_scores():
    torch.manual_seed(0)
    ds = DreamyStart(
        hidden_dim=2, num_thing_queries=2, semantic_classes=[], num_classes=1, seed_sampler="topk"
    )
    with torch.no_grad():
        ds.seed_score.weight.copy_(torch.tensor([[1.0, 0.0]]))
        ds.seed_score.bias.zero_()
    feat = torch.zeros(1, 2, 2, 2)
    feat[0, 0] = torch.tensor([[0.0, 5.0], [1.0, 3.0]])
    pos = torch.zeros_like(feat)
    seeds, seed_pos = ds._adaptive_seeds(feat, pos, 2)
    # scores 0, 5, 1, 3 -> pixels 1 then 3, gated by sigmoid(score)
    assert seeds[0, :, 0].tolist() == pytest.approx(
        [5 / (1 + math.exp(-5)), 3 / (1 + math.exp(-3))]
    )


# --------------------------------------------------------------------------- whole model
TASK_KEYS = {
    "panoptic": "panoptic",
    "instance": "instance",
    "semantic": "sem_seg",
    "superpixel": "superpixel",
}


def _tiny_cfg(task, names):
    cfg = get_cfg()
    cfg.merge_from_file(f"configs/synthetic/{task}-segmentation/clustseg/clustseg_R18_bs8_1k.yaml")
    key = TASK_KEYS[task]
    cfg.DATASETS.TRAIN = (names[f"{key}_train"],)
    cfg.DATASETS.TEST = (names[f"{key}_val"],)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.MODEL.CLUSTSEG.SUPERPIXEL.TRAIN_NUM_RANGE = [50, 64]  # a 64x64 image: 256 pixels at 1/4
    cfg.MODEL.CLUSTSEG.SUPERPIXEL.TEST_NUM = 50
    cfg.MODEL.MASK_CLS.TRAIN_NUM_POINTS = 256
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


@pytest.fixture(scope="module")
def tiny_names(tiny_synthetic):
    return register_synthetic_superpixel(tiny_synthetic)


def test_decoder_structure_two_layers_per_level_and_supervised_esteps(tiny_names):
    cfg = _tiny_cfg("panoptic", tiny_names)
    model = build_model(cfg)
    dec = model.sem_seg_head.predictor
    assert [dec.level_of_layer(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert len(dec.recurrent_cross_attention_layers) == 6
    assert dec.num_aux_outputs == 1 + 6 * (3 + 1) - 1
    # 16 scene-adaptive thing queries + 4 stuff (memory bank) queries
    assert dec.dreamy_start.num_thing == 16 and dec.dreamy_start.semantic_classes == [4, 5, 6, 7]
    assert model.sem_seg_head.pixel_decoder.axial_stages[0].__len__() == 1
    assert model.sem_seg_head.pixel_decoder.axial_stages[1].__len__() == 5
    model.eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    x = [mapper(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])]
    with torch.no_grad():
        images = model.preprocess_images(x)
        out = model.sem_seg_head(model.backbone(images.tensor))
    aux = out["aux_outputs"]
    assert len(aux) == dec.num_aux_outputs
    # initial prediction, then per layer 3 E-steps at the level's size + the layer output
    sizes = [tuple(a["pred_masks"].shape[-2:]) for a in aux] + [tuple(out["pred_masks"].shape[-2:])]
    level = {0: (2, 2), 1: (4, 4), 2: (8, 8)}
    want = [(16, 16)]
    for i in range(6):
        want += [level[i // 2]] * 3 + [(16, 16)]
    assert sizes == want
    assert all(a["pred_logits"].shape == (1, 20, 9) for a in aux)


def test_ablation_switches_build_and_count_outputs(tiny_names):
    for overrides, num_aux in [
        ({"CROSS_ATTENTION": "vanilla", "NUM_ITERATIONS": 1}, 6),
        ({"CROSS_ATTENTION": "kmeans", "NUM_ITERATIONS": 1}, 12),
        ({"NUM_ITERATIONS": 6}, 1 + 6 * 7 - 1),
        ({"ESTEP_SUPERVISION": "last"}, 12),
        ({"THING_QUERY_INIT": "free", "STUFF_QUERY_INIT": "free"}, 24),
        ({"STUFF_QUERY_INIT": "scene_adaptive", "INSTANCE_SEED_SAMPLER": "topk"}, 24),
    ]:
        cfg = _tiny_cfg("panoptic", tiny_names)
        for k, v in overrides.items():
            cfg.MODEL.CLUSTSEG[k] = v
        model = build_model(cfg)
        assert model.sem_seg_head.predictor.num_aux_outputs == num_aux, overrides
        assert len(model.criterion.weight_dict) == 3 * (num_aux + 1)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic", "superpixel"])
def test_train_step_and_eval_on_tiny_synthetic(tiny_names, task, tmp_path):
    cfg = _tiny_cfg(task, tiny_names)
    cfg.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    if task == "superpixel":
        assert set(losses) >= {"loss_slic_ce", "loss_slic_pos", "loss_smooth_l1"}
        assert len(losses) == 3 * (model.sem_seg_head.predictor.num_aux_outputs + 1)
    else:
        assert set(losses) == set(model.criterion.weight_dict)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.sem_seg_head.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    ds = model.sem_seg_head.predictor.dreamy_start
    if task in ("panoptic", "semantic"):
        assert int(ds.memory_count.sum()) > 0  # the banks were filled by the training step

    model.eval()
    evaluator = build_evaluator(cfg, cfg.DATASETS.TEST[0], str(tmp_path / "inference"))
    results = inference_on_dataset(model, build_test_loader(cfg, cfg.DATASETS.TEST[0]), evaluator)
    expected = {
        "panoptic": {"panoptic_seg", "segm", "sem_seg"},
        "instance": {"segm"},
        "semantic": {"sem_seg"},
        "superpixel": {"superpixel"},
    }[task]
    assert expected <= set(results)
    if task == "superpixel":
        r = results["superpixel"]
        assert 0 < r["ASA"] <= 100 and 0 < r["CO"] <= 100
        assert 1 <= r["num_superpixels"] <= 50


def test_superpixel_count_per_call_and_bad_counts(tiny_names):
    cfg = _tiny_cfg("superpixel", tiny_names)
    model = build_model(cfg).eval()
    mapper = build_dataset_mapper(cfg, is_train=False)
    rec = mapper(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])  # 64x64 -> 16x16 = 256 pixels
    with torch.no_grad():
        out = model([dict(rec, num_superpixels=200)])[0]["superpixels"]
        assert out.shape == (64, 64) and out.max() < 200
        assert model.sem_seg_head.predictor.dreamy_start.superpixel
        for bad, msg in [
            (30, r"\[50, 2500\]"),
            (3000, r"\[50, 2500\]"),
            (257, "more clusters than pixels"),
        ]:
            with pytest.raises(ValueError, match=msg):
                model([dict(rec, num_superpixels=bad)])


def test_memory_bank_saved_and_loaded_by_the_checkpointer(tiny_names, tmp_path):
    from seg_methods.engine.trainer import build_checkpointer

    cfg = _tiny_cfg("semantic", tiny_names)
    model = build_model(cfg)
    mapper = build_dataset_mapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    with EventStorage():
        model(batch)
    ds = model.sem_seg_head.predictor.dreamy_start
    assert int(ds.memory_count.sum()) > 0
    build_checkpointer(model, str(tmp_path)).save("model_test")
    other = build_model(cfg)
    assert int(other.sem_seg_head.predictor.dreamy_start.memory_count.sum()) == 0
    build_checkpointer(other, str(tmp_path), strict=True).load(str(tmp_path / "model_test.pth"))
    ods = other.sem_seg_head.predictor.dreamy_start
    assert torch.equal(ods.memory, ds.memory) and torch.equal(ods.memory_count, ds.memory_count)
    assert torch.equal(ods.class_centres(), ds.class_centres())


# --------------------------------------------------------------------------- config checks
SP = "MODEL.CLUSTSEG.SUPERPIXEL."


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("TRAIN_NUM_RANGE", [10, 64], SP + r"TRAIN_NUM_RANGE: .*\[50, 2500\].*got 10"),
        ("TRAIN_NUM_RANGE", [50, 3000], SP + r"TRAIN_NUM_RANGE: .*got 3000"),
        (
            "TRAIN_NUM_RANGE",
            [200, 100],
            SP + r"TRAIN_NUM_RANGE must be \[min, max\] with min <= max",
        ),
        ("TRAIN_NUM_RANGE", [100], SP + r"TRAIN_NUM_RANGE must be \[min, max\]"),
        ("TEST_NUM", 20, SP + r"TEST_NUM: .*\[50, 2500\].*got 20"),
    ],
)
@pytest.mark.parametrize("task", ["superpixel", "panoptic"])
def test_superpixel_numbers_are_checked_when_the_model_is_built(
    tiny_names, task, key, value, message
):
    cfg = _tiny_cfg(task, tiny_names)
    cfg.MODEL.CLUSTSEG.SUPERPIXEL[key] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_superpixel_output_is_derived_from_the_task(tiny_names):
    cfg = _tiny_cfg("superpixel", tiny_names)
    assert cfg.TEST.SUPERPIXEL_ON in (None, True)  # unset, or restated by the dataset's base
    cfg.TEST.SUPERPIXEL_ON = None
    assert superpixel_on(cfg) and model_output_flags(cfg)["SUPERPIXEL_ON"]
    cfg = _tiny_cfg("panoptic", tiny_names)
    assert not superpixel_on(cfg) and not model_output_flags(cfg)["SUPERPIXEL_ON"]
    # another meta-architecture: an explicit flag is taken as given
    cfg.MODEL.META_ARCHITECTURE = "Mask2Former"
    cfg.TEST.SUPERPIXEL_ON = True
    assert superpixel_on(cfg)


@pytest.mark.parametrize("task, flag", [("superpixel", False), ("panoptic", True)])
def test_a_contradicting_superpixel_flag_is_refused(tiny_names, tmp_path, task, flag):
    cfg = _tiny_cfg(task, tiny_names)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.TEST.SUPERPIXEL_ON = flag
    message = r"TEST.SUPERPIXEL_ON=.* contradicts MODEL.CLUSTSEG.TASK="
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
    with pytest.raises(ValueError, match=message):
        build_evaluator(cfg, cfg.DATASETS.TEST[0])


def test_one_deep_supervision_switch(tiny_names):
    cfg = _tiny_cfg("panoptic", tiny_names)
    cfg.MODEL.MASK_CLS.DEEP_SUPERVISION = False
    model = build_model(cfg)
    dec = model.sem_seg_head.predictor
    assert dec.supervised_esteps() == []  # no E-step prediction at all, whatever ESTEP_SUPERVISION
    assert dec.num_aux_outputs == 6 - 1 + 1  # initial prediction + 5 layer outputs
    assert set(model.criterion.weight_dict) == {"loss_ce", "loss_mask", "loss_dice"}
    cfg = _tiny_cfg("superpixel", tiny_names)
    cfg.MODEL.MASK_CLS.DEEP_SUPERVISION = False
    model = build_model(cfg)
    assert isinstance(model.criterion, SuperpixelCriterion)
    assert set(model.criterion.weight_dict) == {"loss_slic_ce", "loss_slic_pos", "loss_smooth_l1"}


def test_superpixel_criterion_suffixes_and_weights():
    torch.manual_seed(0)
    crit = SuperpixelCriterion(
        slic_weight=1.0, smooth_l1_weight=10.0, compactness=0.003, num_aux_outputs=2
    )
    assert crit.weight_dict == {
        f"{k}{s}": w
        for s in ("", "_0", "_1")
        for k, w in (("loss_slic_ce", 1.0), ("loss_slic_pos", 1.0), ("loss_smooth_l1", 10.0))
    }
    final, aux0 = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    outputs = {"pred_masks": final, "aux_outputs": [{"pred_masks": aux0}, {"pred_masks": final}]}
    regions = torch.arange(4).repeat_interleave(4).view(1, 1, 16).expand(1, 16, 16).contiguous()
    targets = {"regions": regions, "image": torch.randn(1, 3, 16, 16)}
    losses = crit(outputs, targets)
    assert set(losses) == set(crit.weight_dict)
    for k in ("loss_slic_ce", "loss_slic_pos", "loss_smooth_l1"):
        assert torch.equal(losses[k], losses[k + "_1"])  # same prediction, same loss
    weighted = crit.apply_weights(losses)
    assert torch.equal(weighted["loss_smooth_l1_0"], 10.0 * losses["loss_smooth_l1_0"])
    no_aux = SuperpixelCriterion(
        slic_weight=1.0,
        smooth_l1_weight=10.0,
        compactness=0.003,
        num_aux_outputs=2,
        deep_supervision=False,
    )
    assert set(no_aux(outputs, targets)) == {"loss_slic_ce", "loss_slic_pos", "loss_smooth_l1"}
