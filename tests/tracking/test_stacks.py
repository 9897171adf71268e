"""Models with several stacks: each FFN counts the rows of its own stack, never a mask given for another.

Every case is checked against an independent float64 capture of each FFN's own pre/post
(``tests/stack_reference.py``), with the real rows chosen by the test: a vision tower's every patch row,
a language model's ``attention_mask``, a decoder's ``decoder_attention_mask``. The vision cases construct
on purpose the coincidence that used to fool the tracker: the vision activations' leading shape equals
the text mask's.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from datasets import Dataset
from stack_reference import StackCapture, all_rows, assert_site, decoder_rows, encoder_rows

import model_adapters
from nerve_hf import FFNTracker

HIDDEN = 32
SMALL = dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)


def text_rows(call: dict, x: torch.Tensor) -> torch.Tensor:
    return call["attention_mask"] != 0


def check_report(report, capture: StackCapture, select_by_stack: dict) -> None:
    for row in report.rows:
        assert_site(row, *capture.rows(row["site"], select_by_stack[row["stack"]]))


# ----------------------------------------------------------------------------- vision–language models
def vlm_sites(tower: str = "model.vision_tower.encoder.layers", pre: str = "mlp.fc1", post: str = "mlp.fc2"):
    """Report name -> (pre path, post path) of a 2-block vision tower's FFNs and a 2-block gated language
    model's (``model.language_model.layers.N.mlp``)."""
    sites = {f"vision.ffn.{i}": (f"{tower}.{i}.{pre}", f"{tower}.{i}.{post}") for i in range(2)}
    language = "model.language_model.layers"
    return sites | {
        f"text.ffn.{i}": (f"{language}.{i}.mlp.gate_proj", f"{language}.{i}.mlp.down_proj") for i in range(2)
    }


def llava():
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=16, patch_size=4, **SMALL),
        text_config=transformers.LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=41, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64,
        ),
        image_token_id=63, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config).eval()
    return model, vlm_sites()


def test_llava_vision_tower_counts_every_patch_even_when_its_shape_is_the_text_masks():
    model, sites = llava()
    capture = StackCapture(model, sites)
    generator = torch.Generator().manual_seed(1)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        for _ in range(2):
            # 2 images of 16 patches + a class token: vision rows [2, 17, D]; text mask [2, 17]: sample 0 is
            # one text token and 16 image tokens, sample 1 16 image tokens and a pad
            ids = torch.randint(1, 60, (2, 17), generator=generator)
            ids[0, 1:] = 63
            ids[1, :16] = 63
            mask = torch.ones(2, 17, dtype=torch.long)
            mask[1, 16] = 0
            pixels = torch.randn(2, 3, 16, 16, generator=generator)
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    capture.remove()
    report = tracker.compute()
    # rows in module order, vision tower first: every patch (and class token) row of both forwards
    assert [row["tokens"] for row in report.rows] == [2 * 2 * 17] * 2 + [2 * 33] * 2
    assert [row["site"] for row in report.rows] == list(sites)
    assert {row["stack"] for row in report.rows} == {"vision", "text"}
    check_report(report, capture, {"vision": all_rows, "text": text_rows})


def t5gemma2():
    """T5Gemma2: a SigLIP tower (16 patches an image) and a text encoder that splices in 4 image tokens, and a
    decoder; each of the three stacks has its own rows."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)  # fmt: skip
    vision = dict(model_type="siglip_vision_model", image_size=16, patch_size=4, **{**SMALL, "intermediate_size": 43})
    tokens = dict(boi_token_index=60, eoi_token_index=61, image_token_index=63)
    encoder = transformers.T5Gemma2EncoderConfig(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, **tokens
    )
    decoder = transformers.T5Gemma2DecoderConfig(**{**text, "intermediate_size": 41})
    model = transformers.T5Gemma2ForConditionalGeneration(
        transformers.T5Gemma2Config(encoder=encoder, decoder=decoder, **tokens)
    ).eval()
    paths = {"vision": ("model.encoder.vision_tower.encoder.layers", "fc1", "fc2"),
             "encoder": ("model.encoder.text_model.layers", "gate_proj", "down_proj"),
             "decoder": ("model.decoder.layers", "gate_proj", "down_proj")}  # fmt: skip
    return model, {
        f"{stack}.ffn.{i}": (f"{blocks}.{i}.mlp.{pre}", f"{blocks}.{i}.mlp.{post}")
        for stack, (blocks, pre, post) in paths.items()
        for i in range(2)
    }


def test_t5gemma2_counts_patches_source_tokens_and_target_tokens_each_in_its_own_stack():
    model, sites = t5gemma2()
    capture = StackCapture(model, sites)
    generator = torch.Generator().manual_seed(1)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        for _ in range(2):
            # vision rows [2, 16, D] and a source mask [2, 16] on purpose; sources of 16 and 13 real tokens
            ids = torch.randint(3, 59, (2, 16), generator=generator)
            ids[:, 2:8] = torch.tensor([60, 63, 63, 63, 63, 61])
            mask = torch.ones(2, 16, dtype=torch.long)
            mask[1, 13:] = 0
            targets = torch.randint(3, 59, (2, 5), generator=generator)
            target_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
            pixels = torch.randn(2, 3, 16, 16, generator=generator)
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, decoder_input_ids=targets,
                  decoder_attention_mask=target_mask)  # fmt: skip
    capture.remove()
    report = tracker.compute()
    by_site = {row["site"]: row for row in report.rows}
    assert sorted(by_site) == sorted(sites)
    assert {site: row["tokens"] for site, row in by_site.items()} == {
        **{f"vision.ffn.{i}": 2 * 2 * 16 for i in range(2)},
        **{f"encoder.ffn.{i}": 2 * 29 for i in range(2)},
        **{f"decoder.ffn.{i}": 2 * 7 for i in range(2)},
    }
    check_report(report, capture, {"vision": all_rows, "encoder": encoder_rows, "decoder": decoder_rows})


def gemma_vlm(family: str):
    """Gemma3 (4 image tokens an image, between begin/end tokens) or PaliGemma (16 image tokens an image first)
    over a SigLIP tower of 16 patches; both with vision rows [2, 16, D] and a text mask [2, 16] on purpose."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=HIDDEN, intermediate_size=41, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)  # fmt: skip
    vision = dict(image_size=16, patch_size=4, **{**SMALL, "intermediate_size": 43}, projection_dim=HIDDEN)
    ids = torch.randint(3, 59, (2, 16), generator=torch.Generator().manual_seed(2))
    if family == "gemma3":
        config = transformers.Gemma3Config(
            text_config={**text, "query_pre_attn_scalar": 16}, vision_config=vision, mm_tokens_per_image=4,
            boi_token_index=60, eoi_token_index=61, image_token_index=63,
        )  # fmt: skip
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
        ids[:, 2:8] = torch.tensor([60, 63, 63, 63, 63, 61])
    else:
        config = transformers.PaliGemmaConfig(
            text_config=dict(model_type="gemma", **text), vision_config=vision, image_token_index=63,
            projection_dim=HIDDEN,
        )  # fmt: skip
        model = transformers.PaliGemmaForConditionalGeneration(config).eval()
        ids[:, :16] = 63
        ids = torch.cat([ids, torch.randint(3, 59, (2, 4), generator=torch.Generator().manual_seed(3))], dim=1)
    return model, vlm_sites(), ids


@pytest.mark.parametrize("family", ["gemma3", "paligemma"])
def test_gemma_vlms_count_every_patch_in_the_tower_and_the_mask_in_the_text(family):
    import warnings

    model, sites, ids = gemma_vlm(family)
    capture = StackCapture(model, sites)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # the second sample's last 3 positions are padding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = FFNTracker(model, flow=False)
    assert not [w for w in caught if "not measured" in str(w.message)]  # both stacks are in the table
    with tracker, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16))
    capture.remove()
    report = tracker.compute()
    by_site = {row["site"]: row["tokens"] for row in report.rows}
    real = 2 * ids.shape[1] - 3
    assert by_site == {"vision.ffn.0": 32, "vision.ffn.1": 32, "text.ffn.0": real, "text.ffn.1": real}
    check_report(report, capture, {"vision": all_rows, "text": text_rows})


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_any_resolution_llavas_count_the_patches_of_every_real_crop(family):
    """Two images of 16x32 and 16x16 pixels in crops of 16x16 (3 and 2 real crops with the base image, the
    batch padded to 3): the tower sees the 5 real crops, every patch row counts; the text counts its mask."""
    torch.manual_seed(0)
    text = transformers.Qwen2Config(hidden_size=HIDDEN, intermediate_size=41, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    tower = dict(image_size=16, patch_size=4, **SMALL)
    if family == "llava_next":
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**tower), text_config=text, image_token_index=63,
            image_grid_pinpoints=[[16, 16], [16, 32]], vision_feature_layer=-1,
        )  # fmt: skip
        model, rows_per_crop = transformers.LlavaNextForConditionalGeneration(config).eval(), 17  # + class token
    else:
        config = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**tower), text_config=text, image_token_index=63,
            image_grid_pinpoints=[[16, 16], [16, 32]], vision_feature_layer=-1,
        )  # fmt: skip
        model, rows_per_crop = transformers.LlavaOnevisionForConditionalGeneration(config).eval(), 16
    sites = vlm_sites()
    generator = torch.Generator().manual_seed(4)
    pixels, sizes = torch.randn(2, 3, 3, 16, 16, generator=generator), torch.tensor([[16, 32], [16, 16]])
    with torch.no_grad():
        n_image = [
            f.shape[0] for f in model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
        ]
    length = max(n_image) + 6
    ids = torch.randint(3, 59, (2, length), generator=generator)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, n in enumerate(n_image):
        ids[i, 1 : 1 + n] = 63
        mask[i, : n + 6 - 3 * i] = 1  # the second sample right-padded
    capture = StackCapture(model, sites)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    capture.remove()
    report = tracker.compute()
    by_site = {row["site"]: row["tokens"] for row in report.rows}
    real_text = int(mask.sum())
    assert by_site == {"vision.ffn.0": 5 * rows_per_crop, "vision.ffn.1": 5 * rows_per_crop,
                       "text.ffn.0": real_text, "text.ffn.1": real_text}  # fmt: skip
    check_report(report, capture, {"vision": all_rows, "text": text_rows})


def test_mistral3_counts_the_patches_of_each_image_at_its_own_size():
    """A 16x16 and a 16x8 image (the second padded to 16x16 in pixel_values): Pixtral cuts each image to its
    size, so its one row holds 16 + 8 patches, all real; the text counts its mask."""
    torch.manual_seed(0)
    text = transformers.MistralConfig(
        hidden_size=HIDDEN,
        intermediate_size=41,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        head_dim=16,
    )
    vision = transformers.PixtralVisionConfig(
        image_size=16, patch_size=4, **{**SMALL, "intermediate_size": 43}, head_dim=16
    )
    config = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=63,
                                         spatial_merge_size=2, vision_feature_layer=-1)  # fmt: skip
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    sites = vlm_sites("model.vision_tower.transformer.layers", "feed_forward.gate_proj", "feed_forward.down_proj")
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 59, (2, 9), generator=generator)
    ids[0, 1:5] = 63  # 4 merged tokens of the 16x16 image, then 2 of the 16x8 one
    ids[1, 1:3] = 63
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    pixels, sizes = torch.randn(2, 3, 16, 16, generator=generator), torch.tensor([[16, 16], [16, 8]])
    capture = StackCapture(model, sites)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    capture.remove()
    report = tracker.compute()
    by_site = {row["site"]: row["tokens"] for row in report.rows}
    assert by_site == {"vision.ffn.0": 24, "vision.ffn.1": 24, "text.ffn.0": 16, "text.ffn.1": 16}
    check_report(report, capture, {"vision": all_rows, "text": text_rows})


def test_a_tower_no_site_measures_is_named_in_a_warning():
    """A VLM whose tower the adapter does not describe: its text stack is measured, and the tracker says
    which tower's FFNs are not (rather than leaving them out without a word)."""
    from model_adapters.spec import ffn

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=16, patch_size=4, **SMALL),
        text_config=transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=41, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_token_id=63,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config)
    text_only = ffn("language_model.layers", pre="mlp.gate_proj", post="mlp.down_proj", gated=True)
    with pytest.warns(RuntimeWarning, match=r"FFNs of model\.vision_tower\.encoder\.layers .* are not measured"):
        tracker = FFNTracker(model, adapter=text_only, flow=False)
    assert [site.site for site in tracker.sites] == ["ffn.0", "ffn.1"]


def qwen2_vl(family: str = "qwen2_vl"):
    """Qwen2-VL (vision MLP fc1 -> act -> fc2) or Qwen2.5-VL (gated vision MLP), tiny, float64."""
    torch.manual_seed(0)
    text = dict(hidden_size=HIDDEN, intermediate_size=41, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=64,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})  # fmt: skip
    tokens = dict(image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    patches = dict(depth=2, num_heads=2, in_channels=3, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision = dict(embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, **patches)
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **tokens)
        model, up, down = transformers.Qwen2VLForConditionalGeneration(config), "fc1", "fc2"
    else:
        vision = dict(hidden_size=HIDDEN, intermediate_size=37, out_hidden_size=HIDDEN, window_size=8,
                      fullatt_block_indexes=[1], **patches)  # fmt: skip
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tokens)
        model, up, down = transformers.Qwen2_5_VLForConditionalGeneration(config), "gate_proj", "down_proj"
    model = model.eval().double()  # float64: exact spectra
    return model, vlm_sites("model.visual.blocks", f"mlp.{up}", f"mlp.{down}")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_flat_patch_rows_all_count_when_their_number_is_batch_times_length(family):
    model, sites = qwen2_vl(family)
    capture = StackCapture(model, sites)
    generator = torch.Generator().manual_seed(1)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        for start in (2, 7):
            # two images of grid 1x4x4: 32 flat patch rows [32, D] = B*T of the text mask [2, 16]
            ids = torch.randint(1, 59, (2, 16), generator=generator)
            ids[0, start : start + 4] = 60
            ids[1, 1:5] = 60
            mask = torch.ones(2, 16, dtype=torch.long)
            mask[1, 11:] = 0
            model(
                input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == 60).long(),
                pixel_values=torch.randn(32, 24, generator=generator, dtype=torch.float64),
                image_grid_thw=torch.tensor([[1, 4, 4]] * 2),
            )  # fmt: skip
    capture.remove()
    report = tracker.compute()
    assert [row["tokens"] for row in report.rows] == [64, 64, 54, 54]  # vision first: every patch row
    assert [row["site"] for row in report.rows] == list(sites)
    check_report(report, capture, {"vision": all_rows, "text": text_rows})


# ----------------------------------------------------------------------------- a vision Trainer
def test_vit_under_trainer_counts_every_patch(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, hidden_dropout_prob=0.0, **SMALL)
    model = transformers.ViTForImageClassification(config)
    sites = {f"ffn.{i}": (f"vit.layers.{i}.mlp.fc1", f"vit.layers.{i}.mlp.fc2") for i in range(2)}
    generator = torch.Generator().manual_seed(2)
    data = Dataset.from_dict(
        {"pixel_values": torch.randn(6, 3, 16, 16, generator=generator).tolist(), "labels": [0, 1, 2, 0, 1, 2]}
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, logging_steps=1,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    capture = StackCapture(model, sites)
    with FFNTracker(model, flow=False) as tracker:
        trainer.train()
    capture.remove()
    report = tracker.compute()
    assert [row["site"] for row in report.rows] == list(sites)
    assert all(row["stack"] == "vision" for row in report.rows)
    check_report(report, capture, {"vision": all_rows})
    assert [row["tokens"] for row in report.rows] == [6 * 17] * 2  # 2 steps x 3 images x (16 patches + class)


# ----------------------------------------------------------------------------- the token sources themselves
def t5(**overrides):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0, **overrides)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


def test_decoder_attention_mask_comes_before_labels():
    model = t5()
    sites = {f"{stack}.ffn.{i}": (f"{stack}.block.{i}.layer.{n}.DenseReluDense.wi",
                                  f"{stack}.block.{i}.layer.{n}.DenseReluDense.wo")
             for stack, n in (("encoder", 1), ("decoder", 2)) for i in range(2)}  # fmt: skip
    capture = StackCapture(model, sites)
    generator = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(2, 50, (3, 8), generator=generator), torch.randint(2, 50, (3, 8), generator=generator)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 7 + [0]])
    decoder_mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 8, [1] * 3 + [0] * 5])  # not the labels' positions
    labels = targets.masked_fill(torch.tensor([[0] * 8, [0] * 4 + [1] * 4, [0] * 8]).bool(), -100)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=decoder_mask,
              labels=labels)  # fmt: skip
    capture.remove()
    report = tracker.compute()
    check_report(report, capture, {"encoder": encoder_rows, "decoder": decoder_rows})
    assert [row["tokens"] for row in report.rows] == [20, 20, 17, 17]


def test_decoder_rows_of_another_length_count_nothing_and_warn():
    from nerve_hf.tracking.stack_tokens import DecoderTokens

    source = DecoderTokens(t5())
    source.begin((), {"labels": torch.tensor([[5, 6, -100], [7, -100, -100]])}, None)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        rows, keep = source.select(torch.randn(2, 4, 7))  # a decoder forward over 4 positions
    assert rows.shape == (0, 7) and keep is None
    rows, _ = source.select(torch.randn(2, 3, 7))
    assert rows.shape == (3, 7)
    assert source.positions(torch.randn(2, 3, 7)).tolist() == [0, 1, 0]


def test_masks_are_never_matched_to_flat_rows_and_all_rows_keeps_samples_only_where_it_can_tell():
    from nerve_hf.tracking.stack_tokens import AllRowsTokens, EncoderTokens

    encoder = EncoderTokens(t5())
    encoder.begin((), {"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}, None)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        assert encoder.select(torch.randn(6, 5))[0].shape == (0, 5)  # [B*T, D] is not the encoder's [B, T, D]
    vision = AllRowsTokens(t5())
    vision.begin((), {"pixel_values": torch.randn(4, 3, 8, 8)}, lambda batch: 2)
    assert vision.select(torch.randn(4, 5, 7))[0].shape == (10, 7)  # the first 2 images' rows
    with pytest.warns(RuntimeWarning, match="cannot tell"):
        assert vision.select(torch.randn(20, 7))[0].shape == (0, 7)  # flat patches: which are the first 2's?


def test_encoder_only_class_measures_its_encoder_and_unknown_sources_are_refused():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=2)
    encoder_only = transformers.T5EncoderModel(config)
    assert [s.site for s in FFNTracker(encoder_only, flow=False).sites] == ["encoder.ffn.0", "encoder.ffn.1"]
    site = model_adapters.FFNSite("ffn", "encoder.block", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo",
                                  tokens="no_such_source")  # fmt: skip
    with pytest.raises(ValueError, match="unknown token source"):
        FFNTracker(encoder_only, adapter=model_adapters.Adapter(sites=(site,)))


def test_device_path_selects_the_same_rows_and_positions_without_host_reads(monkeypatch):
    """On accelerators the sources hand all rows and a keep mask to the accumulators (no host read in a
    hook); forced onto CPU tensors, the rows, counts and position buckets equal the host path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nerve_hf.stats.covariance import CovarianceAccumulator
    from nerve_hf.tracking.points import FFNHookPoints

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in {"_local_scalar_dense", "nonzero", "masked_select", "item"}:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = t5().double()
    generator = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(2, 50, (3, 8), generator=generator), torch.randint(2, 50, (3, 6), generator=generator)
    padded = torch.tensor([[0] * 6, [0] * 2 + [1] * 4, [0] * 5 + [1]]).bool()
    batch = dict(input_ids=ids, attention_mask=torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [0, 0] + [1] * 6]),
                 labels=targets.masked_fill(padded, -100))  # fmt: skip

    def measure():
        tracker = FFNTracker(model, flow=False, position_buckets=[0, 3])
        with tracker, torch.no_grad():
            model(**batch)
        return tracker.compute()

    host = measure()
    monkeypatch.setattr(CovarianceAccumulator, "HOST_SYNC_DEVICE_TYPES", ())
    reads, record = HostReads(), FFNHookPoints.record

    def watched(self, *args, **kwargs):
        with reads:
            return record(self, *args, **kwargs)

    monkeypatch.setattr(FFNHookPoints, "record", watched)
    device = measure()
    assert reads.seen == []
    assert [row["tokens"] for row in device.rows] == [row["tokens"] for row in host.rows] == [19, 19, 13, 13]
    assert len(device.positions) == len(host.positions) == 2 * len(host.rows)  # two buckets per site
    for got, want in zip(device.rows + device.positions, host.rows + host.positions):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value), key
