"""Tests of Mask2Former's parts and of the meta-architecture on the CPU (no official code needed).

Covers Mask2Former (Cheng et al., CVPR 2022) Sec. 3.2: the masked-attention mask (Eq. 2), the
decoder's layer order (masked cross-attention, self-attention, FFN), the number of supervised
predictions and the round-robin over the 1/32, 1/16, 1/8 levels; the sine positional encoding
against a hand computation; the pixel decoder's output strides; and a training step plus
inference of the whole model on the ``tiny_synthetic`` dataset; the pixel decoder reads only its
own config node (MODEL.MSDEFORM_PIXEL_DECODER) and the transformer decoder takes its input and
mask-embedding channels from the pixel decoder.
"""

import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from seg_methods.config import get_cfg
from seg_methods.data.build import build_dataset_mapper
from seg_methods.layers.position_encoding import PositionEmbeddingSine
from seg_methods.modeling import build_pixel_decoder
from seg_methods.modeling.pixel_decoder.msdeformattn import Mask2FormerMSDeformAttnPixelDecoder
from seg_methods.modeling.transformer_decoder.mask2former_decoder import (
    Mask2FormerMaskedAttentionDecoder,
    masked_attention_mask,
)

SYNTHETIC_CONFIG = (
    "configs/synthetic/panoptic-segmentation/mask2former/mask2former_R18_bs8_600it.yaml"
)


# --------------------------------------------------------------------------- attention mask
def test_attention_mask_blocks_below_half_and_repeats_per_head_batch_major():
    # B = 2, Q = 3, 1 x 4 masks at the target size (bilinear resize to the same size is exact)
    logits = torch.tensor(
        [
            [[[1.0, -1.0, 0.0, -0.1]], [[-2.0, -3.0, -0.5, -1e-3]], [[5.0, 4.0, 3.0, 2.0]]],
            [[[-1.0, 1.0, -1.0, 1.0]], [[0.2, -0.2, 0.2, -0.2]], [[-1.0, -1.0, -1.0, -1.0]]],
        ],
        requires_grad=True,
    )
    out = masked_attention_mask(logits, (1, 4), num_heads=2)
    # sigmoid(x) < 0.5 <=> x < 0; sigmoid(0) = 0.5 is not blocked; an all-blocked row is freed
    b0 = torch.tensor(
        [[False, True, False, True], [False, False, False, False], [False, False, False, False]]
    )
    b1 = torch.tensor(
        [[True, False, True, False], [False, True, False, True], [False, False, False, False]]
    )
    assert out.dtype == torch.bool and out.shape == (4, 3, 4)
    # nn.MultiheadAttention's (B * heads, Q, S) layout: image-major, heads consecutive
    assert torch.equal(out[0], b0) and torch.equal(out[1], b0)
    assert torch.equal(out[2], b1) and torch.equal(out[3], b1)
    assert out.grad_fn is None and not out.requires_grad


def test_attention_mask_is_resized_bilinearly_to_the_target_level():
    # 4x4 -> 2x2 with align_corners=False averages each 2x2 block
    logits = torch.tensor(
        [
            [
                [
                    [1.0, 1.0, -3.0, 1.0],
                    [1.0, 1.0, 1.0, -3.0],
                    [-1.0, -1.0, 2.0, -2.0],
                    [-1.0, 3.0, -2.0, 1.0],
                ]
            ]
        ]
    )
    out = masked_attention_mask(logits, (2, 2), num_heads=1)
    # block means: 1, -1, 0, -0.25 -> blocked where < 0
    assert out.tolist() == [[[False, True, False, True]]]


def test_attention_mask_threshold_is_configurable():
    logits = torch.tensor([[[[0.5, 1.5]]]])  # sigmoid: 0.622, 0.818
    out = masked_attention_mask(logits, (1, 2), num_heads=1, threshold=0.7)
    assert out.tolist() == [[[True, False]]]


# --------------------------------------------------------------------------- decoder
def _tiny_decoder(dec_layers=6, nheads=2, hidden=16, queries=4, classes=3):
    torch.manual_seed(0)
    return Mask2FormerMaskedAttentionDecoder(
        in_channels=hidden,
        num_classes=classes,
        hidden_dim=hidden,
        num_queries=queries,
        nheads=nheads,
        dim_feedforward=32,
        dec_layers=dec_layers,
        pre_norm=False,
        mask_dim=hidden,
        enforce_input_project=False,
    ).eval()


PIXEL_DECODER_SHAPES = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=32, stride=16),
    "res5": ShapeSpec(channels=64, stride=32),
}


def test_pixel_decoder_is_built_from_its_own_config_node_only():
    cfg = get_cfg()
    # a second user of the encoder (e.g. Panoptic SegFormer) sets no Mask2Former key
    cfg.MODEL.pop("MASK2FORMER")
    d = cfg.MODEL.MSDEFORM_PIXEL_DECODER
    d.CONVS_DIM, d.MASK_DIM, d.NHEADS, d.TRANSFORMER_ENC_LAYERS = 32, 16, 4, 2
    d.ENC_DIM_FEEDFORWARD, d.ENC_N_POINTS, d.DEFORM_ATTN_IMPL = 64, 2, "pytorch"
    pd = build_pixel_decoder(cfg, "Mask2FormerMSDeformAttnPixelDecoder", PIXEL_DECODER_SHAPES)
    assert (pd.conv_dim, pd.mask_dim) == (32, 16)
    assert len(pd.transformer.encoder.layers) == 2
    attn = pd.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points) == (4, 2)
    assert pd.transformer.encoder.layers[0].linear1.out_features == 64
    assert pd.transformer_in_features == ["res3", "res4", "res5"]


def test_transformer_decoder_takes_channels_from_the_pixel_decoder():
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "Mask2Former"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    d = cfg.MODEL.MSDEFORM_PIXEL_DECODER
    d.CONVS_DIM, d.MASK_DIM, d.TRANSFORMER_ENC_LAYERS = 64, 48, 1
    cfg.MODEL.MASK2FORMER.HIDDEN_DIM = 32
    cfg.MODEL.MASK2FORMER.DEC_LAYERS = 1
    head = build_model(cfg).sem_seg_head
    assert head.predictor.mask_embed.layers[-1].out_features == 48  # = MASK_DIM
    assert head.predictor.input_proj[0].weight.shape == (32, 64, 1, 1)  # CONVS_DIM -> HIDDEN_DIM


# pixel-decoder levels, low to high resolution: 1/32, 1/16, 1/8 of a 64x96 image
LEVEL_SIZES = [(2, 3), (4, 6), (8, 12)]


def _decoder_inputs(batch=2, hidden=16):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(batch, hidden, h, w, generator=g) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(batch, hidden, 16, 24, generator=g)
    return feats, mask_features


def test_decoder_layer_order_and_level_cycling():
    dec = _tiny_decoder(dec_layers=6)
    calls = []

    def hook(kind, i):
        def fn(module, args, kwargs, output):
            memory_len = args[1].shape[0] if kind == "cross" else None
            mask = kwargs.get("memory_mask") if kind == "cross" else None
            calls.append((kind, i, memory_len, mask))

        return fn

    for i in range(6):
        dec.transformer_cross_attention_layers[i].register_forward_hook(
            hook("cross", i), with_kwargs=True
        )
        dec.transformer_self_attention_layers[i].register_forward_hook(
            hook("self", i), with_kwargs=True
        )
        dec.transformer_ffn_layers[i].register_forward_hook(hook("ffn", i), with_kwargs=True)
    feats, mask_features = _decoder_inputs()
    with torch.no_grad():
        out = dec(feats, mask_features)

    assert [(k, i) for k, i, _, _ in calls] == [
        (k, i) for i in range(6) for k in ("cross", "self", "ffn")
    ]
    # layer i attends to level i % 3, starting with the coarsest (1/32)
    cross = [c for c in calls if c[0] == "cross"]
    assert [c[2] for c in cross] == [6, 24, 96, 6, 24, 96]
    # ... with the mask of the previous prediction resized to that level
    preds = [a["pred_masks"] for a in out["aux_outputs"]] + [out["pred_masks"]]
    for i, (_, _, _, mask) in enumerate(cross):
        want = masked_attention_mask(preds[i], LEVEL_SIZES[i % 3], dec.num_heads)
        assert mask.shape == (2 * dec.num_heads, 4, 6 * 4 ** (i % 3))
        assert torch.equal(mask, want)


@pytest.mark.parametrize("dec_layers", [1, 3, 9])
def test_decoder_number_of_predictions(dec_layers):
    dec = _tiny_decoder(dec_layers=dec_layers)
    feats, mask_features = _decoder_inputs()
    with torch.no_grad():
        out = dec(feats, mask_features)
    # learnable-query prediction + one per layer; the last one is the main output
    assert len(out["aux_outputs"]) == dec_layers
    for p in out["aux_outputs"] + [out]:
        assert p["pred_logits"].shape == (2, 4, 4)  # K + 1 = 4 classes
        assert p["pred_masks"].shape == (2, 4, 16, 24)  # at the mask-feature resolution


def _cross_attention_masks(dec):
    masks = []
    for layer in dec.transformer_cross_attention_layers:
        layer.register_forward_hook(
            lambda m, a, kw, o: masks.append(kw["memory_mask"]), with_kwargs=True
        )
    return masks


@pytest.mark.parametrize("dec_layers", [1, 4])
def test_eval_level_size_attention_masks_equal_the_resized_masks(dec_layers):
    # EVAL_LEVEL_SIZE_ATTENTION_MASKS predicts the intermediate masks at the attended level's
    # size from resized mask features: resize and einsum are linear, so every attention mask is
    # the official one except where a mask logit is within rounding of 0 (none here), and the
    # outputs are equal to float rounding. The auxiliary masks are then not computed.
    official, fast = _tiny_decoder(dec_layers=dec_layers), _tiny_decoder(dec_layers=dec_layers)
    fast.eval_level_size_attention_masks = True
    m_off, m_fast = _cross_attention_masks(official), _cross_attention_masks(fast)
    feats, mask_features = _decoder_inputs()
    with torch.no_grad():
        out_off, out_fast = official(feats, mask_features), fast(feats, mask_features)
        # the intermediate masks of the official run, resized to each attended level
        preds = [a["pred_masks"] for a in out_off["aux_outputs"]]
        for i, p in enumerate(preds):
            size = LEVEL_SIZES[i % 3]
            logits = torch.nn.functional.interpolate(p, size=size, mode="bilinear")
            assert logits.abs().min() > 1e-4  # no entry within rounding of the threshold
    assert len(m_fast) == len(m_off) == dec_layers
    for a, b in zip(m_fast, m_off):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_fast["pred_logits"], out_off["pred_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_fast["pred_masks"], out_off["pred_masks"], rtol=1e-5, atol=1e-5)
    assert out_fast["pred_masks"].shape == (2, 4, 16, 24)
    assert [set(a) for a in out_fast["aux_outputs"]] == [{"pred_logits"}] * dec_layers
    for a, b in zip(out_fast["aux_outputs"], out_off["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-6)


def test_eval_level_size_attention_masks_leave_training_unchanged():
    official, fast = _tiny_decoder(dec_layers=3).train(), _tiny_decoder(dec_layers=3).train()
    fast.eval_level_size_attention_masks = True
    feats, mask_features = _decoder_inputs()
    out_off, out_fast = official(feats, mask_features), fast(feats, mask_features)
    for a, b in zip(out_fast["aux_outputs"] + [out_fast], out_off["aux_outputs"] + [out_off]):
        assert {"pred_logits", "pred_masks"} <= set(a)
        assert torch.equal(a["pred_masks"], b["pred_masks"])


def test_attention_mask_at_the_target_size_is_not_resized():
    # the resize at scale 1 is the identity (skipped); the result equals the resized path
    logits = torch.randn(2, 3, 4, 6) * 3
    got = masked_attention_mask(logits, (4, 6), num_heads=2)
    m = torch.nn.functional.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False)
    want = (m.sigmoid().flatten(2) < 0.5).repeat_interleave(2, dim=0)
    want = want & ~want.all(-1, keepdim=True)
    assert torch.equal(got, want)


def test_decoder_learnable_query_prediction_uses_shared_norm_and_heads():
    dec = _tiny_decoder(dec_layers=2)
    feats, mask_features = _decoder_inputs()
    with torch.no_grad():
        out = dec(feats, mask_features)
        q = dec.decoder_norm(dec.query_feat.weight)  # (Q, C), the same for every image
        logits = dec.class_embed(q)
        masks = torch.einsum("qc,bchw->bqhw", dec.mask_embed(q), mask_features)
    first = out["aux_outputs"][0]
    assert torch.allclose(first["pred_logits"], logits.expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(first["pred_masks"], masks, atol=1e-5)


# --------------------------------------------------------------------------- position encoding
def test_position_encoding_hand_computed_2x3():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=100, normalize=True)
    out = pe(torch.zeros(1, 5, 2, 3))
    assert out.shape == (1, 8, 2, 3)
    eps, scale = 1e-6, 2 * math.pi
    dims = [100 ** (2 * (i // 2) / 4) for i in range(4)]  # 1, 1, 10, 10
    for r in range(2):
        for c in range(3):
            y = (r + 1) / (2 + eps) * scale  # 1-based row, normalised by the last one
            x = (c + 1) / (3 + eps) * scale
            want = []
            for t in (y, x):  # y channels first, then x
                want += [
                    math.sin(t / dims[0]),
                    math.cos(t / dims[1]),
                    math.sin(t / dims[2]),
                    math.cos(t / dims[3]),
                ]
            assert out[0, :, r, c].tolist() == pytest.approx(want, abs=1e-6)


def test_position_encoding_without_normalisation_uses_raw_coordinates():
    pe = PositionEmbeddingSine(num_pos_feats=2, temperature=10000, normalize=False)
    out = pe(torch.zeros(2, 1, 2, 3))
    # F = 2: both channels use dim_t = 1 -> (sin y, cos y, sin x, cos x), 1-based coordinates
    assert torch.equal(out[0], out[1])
    assert out[0, :, 1, 2].tolist() == pytest.approx(
        [math.sin(2), math.cos(2), math.sin(3), math.cos(3)], abs=1e-6
    )


# --------------------------------------------------------------------------- pixel decoder
def _small_pixel_decoder(fpn_autocast=False, encoder_ffn_autocast=False):
    torch.manual_seed(0)
    return Mask2FormerMSDeformAttnPixelDecoder(
        PIXEL_DECODER_SHAPES,
        transformer_dropout=0.0,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=1,
        transformer_n_points=2,
        conv_dim=32,
        mask_dim=16,
        norm="GN",
        transformer_in_features=["res3", "res4", "res5"],
        common_stride=4,
        deform_attn_impl="pytorch",
        fpn_autocast=fpn_autocast,
        encoder_ffn_autocast=encoder_ffn_autocast,
    ).eval()


def test_pixel_decoder_output_strides():
    shapes = PIXEL_DECODER_SHAPES
    pd = _small_pixel_decoder()
    assert pd.num_fpn_levels == 1  # 1/8 -> 1/4
    # odd sizes, as a ResNet gives for a 50x75 input
    sizes = {"res2": (13, 19), "res3": (7, 10), "res4": (4, 5), "res5": (2, 3)}
    feats = {k: torch.randn(2, shapes[k].channels, *hw) for k, hw in sizes.items()}
    with torch.no_grad():
        mask_features, coarsest, multi_scale = pd.forward_features(feats)
    assert mask_features.shape == (2, 16, 13, 19)  # 1/4
    assert coarsest.shape == (2, 32, 2, 3)  # 1/32
    assert [tuple(m.shape) for m in multi_scale] == [
        (2, 32, 2, 3),  # 1/32
        (2, 32, 4, 5),  # 1/16
        (2, 32, 7, 10),  # 1/8
    ]
    assert torch.equal(multi_scale[0], coarsest)


def _official_and_fast_pixel_decoders(**fast_options):
    """(official decoder, same weights with ``fast_options``, odd-sized features, {} for dtypes)."""
    official, fast = _small_pixel_decoder(), _small_pixel_decoder(**fast_options)
    fast.load_state_dict(official.state_dict())
    sizes = {"res2": (13, 19), "res3": (7, 10), "res4": (4, 5), "res5": (2, 3)}
    torch.manual_seed(1)
    feats = {k: torch.randn(2, PIXEL_DECODER_SHAPES[k].channels, *hw) for k, hw in sizes.items()}
    return official, fast, feats, {}


def _record_dtype(seen, name):
    def hook(module, inputs, output):
        seen[name] = output.dtype

    return hook


def test_pixel_decoder_fpn_autocast_runs_only_the_fpn_convs_in_bf16():
    """MSDEFORM_PIXEL_DECODER.FPN_AUTOCAST: off (official), the whole decoder ignores an enclosing
    bf16 autocast; on, the encoder stays float32 and only the FPN / mask-feature convs run in
    bf16; without autocast the two settings are the same function."""
    official, fast, feats, seen = _official_and_fast_pixel_decoders(fpn_autocast=True)
    for name in ("layer_1", "mask_features"):
        getattr(fast, name).register_forward_hook(_record_dtype(seen, name))
    with torch.no_grad():
        ref = official.forward_features(feats)
        plain = fast.forward_features(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            off = official.forward_features(feats)
            on = fast.forward_features(feats)
    # no autocast: identical
    assert torch.equal(plain[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(plain[2], ref[2]))
    # official: autocast has no effect at all
    assert torch.equal(off[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(off[2], ref[2]))
    # fast: the FPN convs ran in bf16, outputs are returned in float32
    assert seen == {"layer_1": torch.bfloat16, "mask_features": torch.bfloat16}
    assert on[0].dtype == torch.float32 and all(o.dtype == torch.float32 for o in on[2])
    # the encoder levels (1/32 .. 1/8) are untouched; the 1/4 mask features differ by bf16 rounding
    assert all(torch.equal(a, b) for a, b in zip(on[2], ref[2]))
    assert not torch.equal(on[0], ref[0])
    torch.testing.assert_close(on[0], ref[0], rtol=0.05, atol=0.05 * ref[0].abs().max().item())


def test_pixel_decoder_encoder_ffn_autocast_runs_only_the_ffns_in_bf16():
    """MSDEFORM_PIXEL_DECODER.ENCODER_FFN_AUTOCAST: under a bf16 autocast the encoder FFNs' linear
    layers run in bf16 and the deformable attention in float32; without autocast nothing
    changes."""
    official, fast, feats, seen = _official_and_fast_pixel_decoders(encoder_ffn_autocast=True)
    layer = fast.transformer.encoder.layers[0]
    layer.linear1.register_forward_hook(_record_dtype(seen, "linear1"))
    layer.self_attn.value_proj.register_forward_hook(_record_dtype(seen, "value_proj"))
    with torch.no_grad():
        ref = official.forward_features(feats)
        plain = fast.forward_features(feats)
        assert seen == {"linear1": torch.float32, "value_proj": torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            on = fast.forward_features(feats)
    assert torch.equal(plain[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(plain[2], ref[2]))
    assert seen == {"linear1": torch.bfloat16, "value_proj": torch.float32}
    assert all(o.dtype == torch.float32 for o in on[2]) and on[0].dtype == torch.float32
    assert not torch.equal(on[2][0], ref[2][0])  # bf16 rounding of the FFN
    for a, b in zip(on[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


# --------------------------------------------------------------------------- whole model
def _tiny_cfg(tiny_synthetic):
    cfg = get_cfg()
    cfg.merge_from_file(SYNTHETIC_CONFIG)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", (tiny_synthetic["panoptic_train"],),
            "DATASETS.TEST", (tiny_synthetic["panoptic_val"],),
            "INPUT.MIN_SIZE_TRAIN", (64,),
            "INPUT.MAX_SIZE_TRAIN", 64,
            "INPUT.MIN_SIZE_TEST", 64,
            "INPUT.MAX_SIZE_TEST", 64,
            "MODEL.MASK2FORMER.HIDDEN_DIM", 32,
            "MODEL.MSDEFORM_PIXEL_DECODER.CONVS_DIM", 32,
            "MODEL.MSDEFORM_PIXEL_DECODER.MASK_DIM", 32,
            "MODEL.MSDEFORM_PIXEL_DECODER.NHEADS", 4,
            "MODEL.MASK2FORMER.NHEADS", 4,
            "MODEL.MASK2FORMER.NUM_OBJECT_QUERIES", 10,
            "MODEL.MASK2FORMER.DIM_FEEDFORWARD", 64,
            "MODEL.MSDEFORM_PIXEL_DECODER.ENC_DIM_FEEDFORWARD", 64,
            "MODEL.MSDEFORM_PIXEL_DECODER.TRANSFORMER_ENC_LAYERS", 1,
            "MODEL.MASK2FORMER.DEC_LAYERS", 3,
            "MODEL.MASK_CLS.TRAIN_NUM_POINTS", 256,
        ]
    )  # fmt: skip
    cfg.freeze()
    return cfg


def test_mask2former_train_step_and_inference_on_tiny_synthetic(tiny_synthetic):
    cfg = _tiny_cfg(tiny_synthetic)
    model = build_model(cfg)
    dec_layers = cfg.MODEL.MASK2FORMER.DEC_LAYERS

    # ---- one training step on two mapped images
    mapper = build_dataset_mapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(tiny_synthetic["panoptic_train"])[:2]
    batch = [mapper(d) for d in dicts]
    assert all(len(x["instances"]) > 0 for x in batch)
    model.train()
    losses = model(batch)
    want_keys = {"loss_ce", "loss_mask", "loss_dice"}
    want_keys |= {
        f"{k}_{i}" for k in ("loss_ce", "loss_mask", "loss_dice") for i in range(dec_layers)
    }
    assert set(losses) == want_keys  # DEC_LAYERS + 1 supervised predictions
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
        assert v.item() > 0, k
    sum(losses.values()).backward()
    for prefix in ("backbone.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert sum(float(g.abs().sum()) for g in grads) > 0, prefix

    # ---- inference on two validation images, one asked at another output size
    model.eval()
    test_mapper = build_dataset_mapper(cfg, is_train=False)
    inputs = [test_mapper(d) for d in DatasetCatalog.get(tiny_synthetic["panoptic_val"])[:2]]
    inputs[1]["height"], inputs[1]["width"] = 48, 80
    with torch.no_grad():
        outputs = model(inputs)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for x, out in zip(inputs, outputs):
        h, w = x["height"], x["width"]
        assert set(out) == {"sem_seg", "panoptic_seg", "instances"}
        assert out["sem_seg"].shape == (num_classes, h, w)
        assert torch.isfinite(out["sem_seg"]).all()
        seg, info = out["panoptic_seg"]
        assert seg.shape == (h, w) and seg.dtype == torch.int32
        assert sorted(s["id"] for s in info) == list(range(1, len(info) + 1))
        assert set(seg.unique().tolist()) <= {0} | {s["id"] for s in info}
        inst = out["instances"]
        assert inst.image_size == (h, w)
        assert inst.pred_masks.shape == (len(inst), h, w)
        assert len(inst) <= cfg.MODEL.MASK_CLS.TEST_TOPK_PER_IMAGE
        assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()


def test_batch_without_segments_has_only_the_class_loss(tiny_synthetic):
    """A batch whose images have no annotated segment (all void) pushes every query to no-object:
    the mask losses are zero, the class loss is not. (Finite losses and gradients on such
    batches are checked for every meta-architecture in test_model_e2e.py.)"""
    cfg = _tiny_cfg(tiny_synthetic)
    model = build_model(cfg).train()
    mapper = build_dataset_mapper(cfg, is_train=True)
    d1 = DatasetCatalog.get(tiny_synthetic["panoptic_train"])[1]
    empty = dict(d1, segments_info=[])  # every segment dropped
    assert len(mapper(empty)["instances"]) == 0

    # a batch made only of empty images: mask losses are zero, the class loss is not
    losses = model([mapper(empty), mapper(empty)])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"].item() > 0
    sum(losses.values()).backward()
