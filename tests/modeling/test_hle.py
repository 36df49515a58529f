"""Hierarchical Lovász Embeddings: kernels, losses, Thomson initialisation, decoding, ablations."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

import seg_methods  # noqa: F401  registers the meta-architecture
from seg_methods.config import get_cfg
from seg_methods.modeling.criterion.hle import (
    HLECriterion,
    HLEEmbeddingSpace,
    associative_embedding_loss,
    cosine_kernel,
    instance_kernel,
    pixel_positions,
    split_embedding,
    thomson_energy,
    thomson_init,
)
from seg_methods.modeling.postprocessing.hle_decoding import (
    embedding_to_rgb,
    greedy_seed_clustering,
    hle_panoptic_decode,
    seed_candidates,
)
from repo_scripts import load_script

IGNORE = 255
WEIGHTS = {"seg": 1.0, "seg_mean": 1.0, "ins": 1.0, "ins_var": 10.0, "seed": 1.0}
QUICK = "configs/quick_schedules/hle_synthetic_panoptic_instant_test.yaml"


def _criterion(**kw):
    return HLECriterion(num_classes=4, ignore_value=IGNORE, weights=dict(WEIGHTS), **kw)


def _space(sem_sigma=0.1, spatial_sigma=1e3):
    space = HLEEmbeddingSpace(4, 8, semantic_sigma_init=sem_sigma, spatial_sigma_init=spatial_sigma)
    with torch.no_grad():
        space.class_means.copy_(torch.eye(8)[:4])  # class k's mean: e_k
    return space


def _scene():
    """An 8x8 image, D = 8: class 2 (stuff) everywhere except two instances of class 0 (things)
    at rows 0-3 / cols 0-3 and rows 4-7 / cols 4-7. Perfect embeddings: instance l of class 0 at
    normalize(e_0 + e_{4+l}), stuff at e_2."""
    sem = torch.full((8, 8), 2, dtype=torch.long)
    ids = torch.zeros((8, 8), dtype=torch.long)
    sem[:4, :4], ids[:4, :4] = 0, 1
    sem[4:, 4:], ids[4:, 4:] = 0, 2
    eye = torch.eye(8)
    emb = eye[2].view(8, 1, 1).repeat(1, 8, 8)
    emb[:, :4, :4] = F.normalize(eye[0] + eye[4], dim=0).view(8, 1, 1)
    emb[:, 4:, 4:] = F.normalize(eye[0] + eye[5], dim=0).view(8, 1, 1)
    return emb, sem, ids


def _outputs(emb, seed, sigma=0.1):
    b = emb.shape[0]
    return {
        "sem_embedding": emb,
        "ins_embedding": emb,
        "ins_sigma": torch.full((b, *emb.shape[-2:]), sigma),
        "seed": seed,
    }


# --------------------------------------------------------------------------- kernels
def test_kernels_match_equations_7_8_9():
    # Eq. 7: exp(-d_cos / (2 sigma^2)); d_cos(e_0, (e_0 + e_1)/sqrt2) = 1 - 1/sqrt2
    d = 1 - 1 / math.sqrt(2)
    assert float(cosine_kernel(torch.tensor(d), torch.tensor(0.5))) == pytest.approx(
        math.exp(-d / 0.5)
    )
    # Eq. 8 on two pixels: positions (0, 0) and (0, 2) / 2 = (0, 1); centre (0, 0)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    phi = instance_kernel(
        emb, pos, torch.tensor([1.0, 0.0]), torch.zeros(2), torch.tensor(0.5), torch.tensor(2.0)
    )
    assert phi[0] == pytest.approx(1.0)
    assert phi[1] == pytest.approx(math.exp(-1.0 / 0.5) * math.exp(-1.0 / 8.0))
    assert torch.allclose(pixel_positions(2, 3, 2.0)[4], torch.tensor([0.5, 0.5]))
    # Eq. 9: psi_k = p_k / sum_c p_c with per-class sigma_k
    space = HLEEmbeddingSpace(2, 2, semantic_sigma_init=1.0, thomson=False)
    with torch.no_grad():
        space.class_means.copy_(torch.eye(2))
        space.log_semantic_sigma.copy_(torch.log(torch.tensor([0.5, 1.0])))
    e = F.normalize(torch.tensor([1.0, 1.0]), dim=0).view(1, 2, 1, 1)
    psi = space.semantic_logits(e).softmax(dim=1).flatten()
    p = torch.tensor([math.exp(-d / 0.5), math.exp(-d / 2.0)])
    assert torch.allclose(psi, p / p.sum(), atol=1e-6)


# --------------------------------------------------------------------------- losses
def test_perfect_embeddings_give_near_zero_losses_and_wrong_ones_do_not():
    emb, sem, ids = _scene()
    space, crit = _space(), _criterion()
    pos = pixel_positions(8, 8, 8.0)
    seed = torch.zeros(1, 8, 8)
    seed[0][ids > 0] = 1.0  # phi = 1 on perfect instance pixels (spatial sigma 1e3)
    losses = crit(_outputs(emb[None], seed), sem[None], ids[None], space, pos)
    assert set(losses) == {"loss_seg", "loss_seg_mean", "loss_ins", "loss_ins_var", "loss_seed"}
    for k in ("loss_seg", "loss_ins", "loss_ins_var", "loss_seed"):
        assert float(losses[k]) < 1e-3, (k, float(losses[k]))
    # instance 2 given instance 1's embedding: L_ins jumps (two instances merged)
    bad = emb.clone()
    bad[:, 4:, 4:] = emb[:, :1, :1]
    losses = crit(_outputs(bad[None], seed), sem[None], ids[None], space, pos)
    assert float(losses["loss_ins"]) > 0.5
    # stuff pixels given the thing class mean: L_seg jumps
    bad = emb.clone()
    bad[:, :4, 4:] = torch.eye(8)[0].view(8, 1, 1)
    losses = crit(_outputs(bad[None], seed), sem[None], ids[None], space, pos)
    assert float(losses["loss_seg"]) > 0.1


def test_lovasz_instance_loss_is_twice_equation_3_at_a_vertex():
    """Feeding 2 phi - 1 to the hinge: for phi in {0, 1} the loss is 2 x (1 - IoU)."""
    emb, sem, ids = _scene()
    space, crit = _space(), _criterion()
    # every pixel on instance 1's direction: instance 1's phi = 1 on 64 pixels, IoU 16 / 64
    # (instance 2's mean is the same, IoU 16 / 64 too)
    same = emb[:, :1, :1].expand(8, 8, 8).contiguous()
    losses = crit(
        _outputs(same[None], torch.zeros(1, 8, 8)),
        sem[None],
        ids[None],
        space,
        pixel_positions(8, 8, 8.0),
    )
    assert float(losses["loss_ins"]) == pytest.approx(2 * (1 - 16 / 64), abs=1e-5)


def test_seed_loss_stops_the_gradient_to_the_embedding():
    emb, sem, ids = _scene()
    emb = F.normalize(
        emb + 0.1 * torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(0)), dim=0
    )
    emb = emb[None].clone().requires_grad_(True)
    seed = torch.full((1, 8, 8), 0.3, requires_grad=True)
    sigma = torch.full((1, 8, 8), 0.4, requires_grad=True)
    out = {"sem_embedding": emb, "ins_embedding": emb, "ins_sigma": sigma, "seed": seed}
    losses = _criterion()(out, sem[None], ids[None], _space(), pixel_positions(8, 8, 8.0))
    losses["loss_seed"].backward()
    assert emb.grad is None or float(emb.grad.abs().max()) == 0.0
    assert sigma.grad is None or float(sigma.grad.abs().max()) == 0.0
    assert float(seed.grad.abs().max()) > 0
    # the seed target on stuff is 0: d/ds (s - 0)^2 / P = 2 * 0.3 / 64
    assert float(seed.grad[0, 0, 7]) == pytest.approx(2 * 0.3 / 64, rel=1e-5)


def test_instance_variance_loss_value_and_gradient():
    emb, sem, ids = _scene()
    sigma = torch.full((1, 8, 8), 0.5)
    sigma[0, :4, :4] = torch.tensor([1.0, 3.0]).repeat(8)[:16].view(4, 4)  # mean 2, (s - 2)^2 = 1
    sigma.requires_grad_(True)
    out = _outputs(emb[None], torch.zeros(1, 8, 8))
    out["ins_sigma"] = sigma
    losses = _criterion()(out, sem[None], ids[None], _space(), pixel_positions(8, 8, 8.0))
    # gamma * sum over the 32 instance pixels / 32: instance 1 gives 16 * 1, instance 2 gives 0
    assert float(losses["loss_ins_var"]) == pytest.approx(10.0 * 16 / 32)
    (g,) = torch.autograd.grad(losses["loss_ins_var"], sigma)
    # d/ds_i gamma (s_i - 2)^2 / 32 = gamma * 2 (s_i - 2) / 32 (the sg on sigma_hat of Eq. 14
    # does not change this gradient: the deviations from the mean sum to 0)
    assert float(g[0, 0, 0]) == pytest.approx(10 * 2 * (1.0 - 2.0) / 32)
    assert float(g[0, 0, 1]) == pytest.approx(10 * 2 * (3.0 - 2.0) / 32)


def test_void_and_empty_images_give_finite_losses():
    emb, sem, ids = _scene()
    space, crit = _space(), _criterion()
    pos = pixel_positions(8, 8, 8.0)
    emb = emb[None].repeat(2, 1, 1, 1).requires_grad_(True)
    sems = torch.stack([torch.full_like(sem, IGNORE), torch.full_like(sem, 2)])  # all void; stuff
    idss = torch.stack([ids, torch.zeros_like(ids)])  # ids of the void image are ignored
    losses = crit(_outputs(emb, torch.rand(2, 8, 8)), sems, idss, space, pos)
    for k, v in losses.items():
        assert torch.isfinite(v), k
    assert float(losses["loss_ins"]) == 0.0 and float(losses["loss_ins_var"]) == 0.0
    sum(losses.values()).backward()
    # every pixel void: all terms 0 and still on the graph
    losses = crit(
        _outputs(emb, torch.rand(2, 8, 8)), torch.full_like(sems, IGNORE), idss, space, pos
    )
    assert all(float(v) == 0.0 for v in losses.values())
    sum(losses.values()).backward()


def test_vq_loss_regresses_persistent_means_to_detached_batch_means():
    emb, sem, ids = _scene()
    space = _space()
    emb = emb[None].clone().requires_grad_(True)
    losses = _criterion()(
        _outputs(emb, torch.zeros(1, 8, 8)), sem[None], ids[None], space, pixel_positions(8, 8, 8.0)
    )
    batch_mean0 = F.normalize(
        F.normalize(torch.eye(8)[0] + torch.eye(8)[4], dim=0)
        + F.normalize(torch.eye(8)[0] + torch.eye(8)[5], dim=0),
        dim=0,
    )
    expected = ((torch.eye(8)[0] - batch_mean0) ** 2).sum() / 2  # class 2 matches exactly
    assert float(losses["loss_seg_mean"]) == pytest.approx(float(expected), rel=1e-5)
    (g_emb,) = torch.autograd.grad(losses["loss_seg_mean"], emb, allow_unused=True)
    assert g_emb is None or float(g_emb.abs().max()) == 0.0
    assert not _criterion(vq_loss=False)(
        _outputs(emb, torch.zeros(1, 8, 8)), sem[None], ids[None], space, pixel_positions(8, 8, 8.0)
    ).get("loss_seg_mean")


@pytest.mark.parametrize(
    "kw",
    [
        {"instance_loss": "bce"},
        {"instance_loss": "associative"},
        {"semantic_loss": "cross_entropy"},
        {"semantic_loss": "associative"},
        {"semantic_means": "image"},
        {"seg_lovasz_classes": "all"},
    ],
)
def test_ablation_losses_are_finite_and_differentiable(kw):
    emb, sem, ids = _scene()
    emb = F.normalize(emb + 0.2 * torch.rand(8, 8, 8), dim=0)[None].requires_grad_(True)
    out = _outputs(emb, torch.rand(1, 8, 8))
    losses = _criterion(**kw)(out, sem[None], ids[None], _space(), pixel_positions(8, 8, 8.0))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert float(emb.grad.abs().sum()) > 0


def test_associative_loss_is_zero_for_separated_groups():
    e = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    assert float(associative_embedding_loss(e, torch.tensor([1, 1, 2]), 0.5, 1.5)) == 0.0
    # push: groups at L1 distance 1 with margin 1.5: (1.5 - 1)^2 on both ordered pairs
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert float(associative_embedding_loss(e, torch.tensor([1, 2]), 0.5, 1.5)) == 0.25


def test_split_embedding_halves_are_unit():
    e = F.normalize(torch.randn(2, 12, 3, 3), dim=1)
    s, i = split_embedding(e, True)
    assert s.shape[1] == i.shape[1] == 6
    assert torch.allclose(s.norm(dim=1), torch.ones(2, 3, 3))
    assert split_embedding(e, False)[0] is e


def test_nan_embeddings_propagate_to_the_losses():
    """The trainer's divergence guard (seg_methods.engine.trainer: FloatingPointError naming the
    iteration and the loss terms when the loss is not finite) fires only if NaN reaches a loss."""
    emb, sem, ids = _scene()
    emb = emb[None].clone()
    emb[0, :, 1, 1] = float("nan")
    losses = _criterion()(
        _outputs(emb, torch.rand(1, 8, 8)),
        sem[None],
        ids[None],
        _space(),
        pixel_positions(8, 8, 8.0),
    )
    assert not torch.isfinite(losses["loss_seg"])
    assert not torch.isfinite(losses["loss_ins"])
    assert not torch.isfinite(sum(losses.values()))


# --------------------------------------------------------------------------- Thomson
def test_thomson_init_lowers_the_energy_spreads_the_means_and_is_deterministic():
    start = F.normalize(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1
    ).float()
    means = thomson_init(4, 3, iters=500, lr=0.05, seed=0)
    assert torch.allclose(thomson_init(0 + 4, 3, iters=0, seed=0), start)
    assert float(thomson_energy(means)) < float(thomson_energy(start))
    assert torch.allclose(means.norm(dim=1), torch.ones(4), atol=1e-6)

    def min_dcos(m):
        d = 1 - m @ m.t()
        return float(d[~torch.eye(len(m), dtype=torch.bool)].min())

    assert min_dcos(means) > min_dcos(start)
    # 4 points on S^2: the regular tetrahedron, pairwise cosine -1/3 (d_cos 4/3)
    assert min_dcos(means) == pytest.approx(4 / 3, abs=2e-2)
    assert torch.equal(means, thomson_init(4, 3, iters=500, lr=0.05, seed=0))


# --------------------------------------------------------------------------- decoding
def _decoding_scene(uniform_seed=False):
    """16x16 map, D = 4: stuff class 1 everywhere, thing class 0 on two squares (rows/cols 2-6
    and 9-13) with embeddings e_0 and e_1; stuff at e_3."""
    eye = torch.eye(4)
    emb = eye[3].view(4, 1, 1).repeat(1, 16, 16)
    sem = torch.ones(16, 16, dtype=torch.long)
    a = (slice(2, 7), slice(2, 7))
    b = (slice(9, 14), slice(9, 14))
    emb[(slice(None),) + a] = eye[0].view(4, 1, 1)
    emb[(slice(None),) + b] = eye[1].view(4, 1, 1)
    sem[a], sem[b] = 0, 0
    probs = F.one_hot(sem, 2).permute(2, 0, 1).float() * 0.9 + 0.05
    seed = torch.zeros(16, 16)
    seed[a] = 0.9 if uniform_seed else 0.6
    seed[b] = 0.9 if uniform_seed else 0.6
    if not uniform_seed:
        seed[4, 4], seed[11, 11] = 0.95, 0.9
    mask_a = torch.zeros(16, 16, dtype=torch.bool)
    mask_b = torch.zeros(16, 16, dtype=torch.bool)
    mask_a[a], mask_b[b] = True, True
    return emb, torch.full((16, 16), 0.3), seed, probs, mask_a, mask_b


@pytest.mark.parametrize("uniform_seed", [False, True])
@pytest.mark.parametrize("downsample", [1, 2])
def test_decoding_recovers_two_instances_and_stuff(uniform_seed, downsample):
    emb, sigma, seed, probs, mask_a, mask_b = _decoding_scene(uniform_seed)
    out = hle_panoptic_decode(
        emb,
        sigma,
        seed,
        probs,
        thing_ids=[0],
        spatial_sigma=100.0,
        coord_scale=16.0,
        downsample=downsample,
    )
    pan, info = out["panoptic_seg"], out["segments_info"]
    things = [s for s in info if s["isthing"]]
    stuff = [s for s in info if not s["isthing"]]
    assert len(things) == 2 and len(stuff) == 1 and stuff[0]["category_id"] == 1
    masks = sorted((pan == s["id"] for s in things), key=lambda m: int(m.nonzero()[0, 0]))
    assert torch.equal(masks[0], mask_a) and torch.equal(masks[1], mask_b)
    assert torch.equal(pan == stuff[0]["id"], ~(mask_a | mask_b))
    assert out["instance_masks"].shape == (2, 16, 16)
    assert out["instance_classes"].tolist() == [0, 0]


def test_decoding_spatial_term_splits_identical_embeddings():
    """Both squares with the same embedding: only the spatial kernel separates them."""
    emb, sigma, seed, probs, mask_a, mask_b = _decoding_scene()
    emb[:, mask_b] = emb[:, mask_a][:, :1]
    kw = dict(thing_ids=[0], coord_scale=16.0)
    assert (
        sum(
            s["isthing"]
            for s in hle_panoptic_decode(emb, sigma, seed, probs, spatial_sigma=100.0, **kw)[
                "segments_info"
            ]
        )
        == 1
    )
    out = hle_panoptic_decode(emb, sigma, seed, probs, spatial_sigma=0.2, **kw)
    assert sum(s["isthing"] for s in out["segments_info"]) == 2


def test_decoding_without_instances_gives_stuff_only():
    emb, sigma, seed, probs, _, _ = _decoding_scene()
    out = hle_panoptic_decode(
        emb, sigma, torch.zeros(16, 16), probs, thing_ids=[0], spatial_sigma=1.0, coord_scale=16.0
    )
    assert [s["isthing"] for s in out["segments_info"]] == [False]
    assert out["instance_masks"].shape == (0, 16, 16)
    # stuff threshold: psi = 0.95 < 0.97 -> no stuff either, all void
    out = hle_panoptic_decode(
        emb,
        sigma,
        torch.zeros(16, 16),
        probs,
        thing_ids=[0],
        spatial_sigma=1.0,
        coord_scale=16.0,
        stuff_threshold=0.97,
    )
    assert out["segments_info"] == [] and int(out["panoptic_seg"].abs().sum()) == 0


def test_seed_nms_and_greedy_clustering_primitives():
    seed = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.4, 0.8], [0.7, 0.1, 0.1]])
    cand = seed_candidates(seed, torch.ones(3, 3, dtype=torch.bool), 0.5)
    assert cand.tolist() == [1, 6]  # 0.9, then 0.7 (a local maximum); 0.8 is next to 0.9
    emb = torch.eye(2)[torch.tensor([0, 0, 1])]  # 3 pixels
    labels, seeds, best = greedy_seed_clustering(
        torch.tensor([0, 1, 2]),
        emb,
        torch.zeros(3, 2),
        torch.full((3,), 0.3),
        torch.ones(3, dtype=torch.bool),
        spatial_sigma=1.0,
        mask_threshold=0.5,
        merge_threshold=0.5,
        max_instances=10,
    )
    assert seeds.tolist() == [0, 2] and labels.tolist() == [0, 0, 1]  # candidate 1 merged


def test_embedding_to_rgb():
    e = torch.zeros(4, 2, 2)
    e[0, 0, 0], e[1, 0, 0], e[2, 0, 0] = 1.0, -1.0, 0.0
    rgb = embedding_to_rgb(e)
    assert rgb.shape == (2, 2, 3) and rgb.dtype.name == "uint8"
    assert rgb[0, 0].tolist() == [255, 0, 128]


# --------------------------------------------------------------------------- model
def _model(**hle):
    cfg = get_cfg()
    cfg.merge_from_file(QUICK)
    cfg.MODEL.HLE.THOMSON_ITERS = 5
    cfg.MODEL.HLE.DECODE.MAX_INSTANCES = 5  # random weights: keep the decoding loop short
    for k, v in hle.items():
        cfg.MODEL.HLE[k] = v
    torch.manual_seed(0)
    return build_model(cfg)


def _batch():
    sem = torch.full((64, 64), 5, dtype=torch.long)
    ids = torch.zeros(64, 64, dtype=torch.long)
    sem[8:24, 8:24], ids[8:24, 8:24] = 1, 1
    sem[40:56, 30:60], ids[40:56, 30:60] = 2, 2
    img = torch.randint(
        0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return [{"image": img, "sem_seg": sem, "instance_ids": ids}]


@pytest.mark.parametrize(
    "hle",
    [
        {},
        {"SEMANTIC_BRANCH": "separate", "SEMANTIC_LOSS": "cross_entropy"},
        {"SPLIT_EMBEDDING": True},
    ],
)
def test_model_variants_train_and_infer(hle):
    model = _model(**hle).train()
    with EventStorage():
        losses = model(_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": _batch()[0]["image"], "height": 40, "width": 50}])
    assert out["sem_seg"].shape == (8, 40, 50)
    assert out["panoptic_seg"][0].shape == (40, 50)
    assert model.embeddings(_batch())[0].shape == (12, 64, 64)


def test_model_nan_weights_give_a_non_finite_loss():
    model = _model().train()
    with torch.no_grad():
        model.embedding_head.bias.fill_(float("nan"))
    with EventStorage():
        losses = model(_batch())
    assert not torch.isfinite(sum(losses.values()))


def test_model_requires_instance_ids():
    model = _model().train()
    batch = _batch()
    del batch[0]["instance_ids"]
    with pytest.raises(ValueError, match="instance_embedding"):
        with EventStorage():
            model(batch)


def test_demo_paints_the_embedding(tmp_path, capsys):
    """demo/demo.py --paint-embedding writes <drawing>.embedding.png: the output "embedding"'s
    first three dimensions mapped from [-1, 1] to [0, 255]; other models are refused."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    demo = load_script("demo/demo.py", "seg_demo")
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(img)
    quick = os.path.join(repo, "configs/quick_schedules")
    out = tmp_path / "out"
    argv = ["--input", str(img), "--output", str(out), "--random-weights"]
    result = demo.main(
        ["--config-file", os.path.join(quick, "hle_synthetic_panoptic_instant_test.yaml")]
        + argv
        + ["--paint-embedding", "INPUT.MIN_SIZE_TEST", "0"]
    )
    painted_path = out / "a.embedding.png"
    assert str(painted_path) in result.written
    painted = np.asarray(Image.open(painted_path))
    assert painted.shape == (36, 44, 3)
    assert "painted the embedding" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--paint-embedding needs a HierarchicalLovaszEmbedding"):
        demo.main(
            [
                "--config-file",
                os.path.join(quick, "per_pixel_deeplabv3plus_synthetic_semantic_instant_test.yaml"),
            ]
            + argv
            + ["--paint-embedding"]
        )


def test_output_embedding_is_the_unit_embedding():
    model = _model()
    model.output_embedding = True
    model.eval()
    image = _batch()[0]["image"]
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 40, "width": 50}])
        emb = model.forward_head(model.preprocess_images([{"image": image}]).tensor)["embedding"]
    assert out["embedding"].shape == (12, 40, 50)
    assert torch.allclose(out["embedding"].norm(dim=0), torch.ones(40, 50), atol=1e-5)
    ref = F.normalize(F.interpolate(emb, size=(40, 50), mode="bilinear"), dim=1)[0]
    assert torch.allclose(out["embedding"], ref, atol=1e-6)
    rgb = embedding_to_rgb(out["embedding"])
    expect = ((out["embedding"][:3].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(rgb, expect.numpy())
