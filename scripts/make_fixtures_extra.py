#!/usr/bin/env python
"""Extra BLOOM / Phi-3 parity fixtures that scripts/make_fixtures.py does not make (yet).

    python scripts/make_fixtures_extra.py            # every extra fixture
    python scripts/make_fixtures_extra.py --list

Same conventions, same helpers (imported from make_fixtures.py): tiny configs, eager attention,
every weight perturbed away from its init, float32, left-padded batches, reference.npz +
reference.json beside config.json + model.safetensors under tests/fixtures/<name>/. The
fixtures are listed in tests/fixtures/MANIFEST_extra.json (MANIFEST.json belongs to
make_fixtures.py).

    phi3_partial_rotary   Phi-4-mini-style Phi-3: partial_rotary_factor 0.5 with longrope factors for
                          the rotated half only, tied embeddings, sliding_window 6; generation crosses
                          both the window and original_max_position_embeddings
    bloom_hub_post_ln     BLOOM saved like the Hub (n_embed / num_attention_heads spelling, keys without
                          'transformer.'), 5 heads, apply_residual_connection_post_layernorm=True
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

EXTRA = {}


def extra_fixture(name, family, head, description):
    def register(fn):
        mf.REGISTRY[name] = EXTRA[name] = dict(fn=fn, family=family, head=head, description=description)
        return fn

    return register


def causal_lm_fixture(model, ids, mask, sides, gen_ids, gen_mask, max_new_tokens, meta_extra, use_positions=True):
    inputs = dict(input_ids=ids, attention_mask=mask, labels=mf.causal_labels(ids, mask))
    if use_positions:
        inputs["position_ids"] = mf.positions_from_mask(mask)
    arrays, info, _ = mf.run_forward(model, inputs)
    gen_arrays, gen_meta = mf.run_generation(model, gen_ids, gen_mask, max_new_tokens=max_new_tokens)
    arrays.update(gen_arrays)
    meta = mf.base_meta(model, mf.padding_meta(mask, sides), info)
    if use_positions:
        meta["inputs"]["position_ids"] = mf.POSITION_RULE
    meta.update({"labels": "labels = input_ids with -100 at padding", "generation": gen_meta})
    meta.update(meta_extra)
    return inputs, arrays, meta


PARTIAL_SHORT = [1.0, 1.1, 1.3, 1.6]  # head_dim 16, partial 0.5 -> rope_dim 8 -> 4 factors
PARTIAL_LONG = [1.0, 2.0, 4.5, 9.0]


@extra_fixture(
    "phi3_partial_rotary", "phi3", "causal_lm",
    "Phi3ForCausalLM like Phi-4-mini: partial_rotary_factor 0.5 (rope_dim 8 of head_dim 16) with 4 longrope "
    "factors, original 12 / max 48, tied embeddings, sliding_window 6; generation from 8 to 18 tokens crosses the "
    "window and the original length",
)
def build_phi3_partial_rotary():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": PARTIAL_SHORT, "long_factor": PARTIAL_LONG}
    model = mf.phi3_model("Phi3ForCausalLM", 800, rope_parameters=rope, tie_word_embeddings=True,
                          sliding_window=6, max_position_embeddings=48, original_max_position_embeddings=12)
    ids, mask, sides = mf.make_batch(seed=81, seq_len=12, real_lengths=[12, 9, 5])
    gids, gmask, _ = mf.make_batch(seed=82, seq_len=8, real_lengths=[8, 6, 4])
    inputs, arrays, meta = causal_lm_fixture(model, ids, mask, sides, gids, gmask, 10, {
        "weight_layout": mf.PHI3_LAYOUT.replace("lm_head.weight (untied)", "lm_head tied to embed_tokens"),
        "notes": list(mf.PHI3_NOTES) + [
            "partial_rotary_factor 0.5: RoPE rotates the first 8 of 16 dims per head (split halves of those 8); "
            "the other 8 pass through. longrope factors have rope_dim // 2 = 4 entries.",
            "sliding_window 6: a query sees itself and the 5 keys before it.",
            mf.LONGROPE_CACHE_RULE,
        ],
    })
    return dict(save=mf.save_with(model), arrays=arrays, meta=meta,
                reload=mf.reload_checker(transformers.Phi3ForCausalLM, inputs))


@extra_fixture(
    "bloom_hub_post_ln", "bloom", "causal_lm",
    "BloomForCausalLM saved in the Hub's spelling (config n_embed + num_attention_heads, tensor names without "
    "'transformer.'), 5 heads (hidden 20), apply_residual_connection_post_layernorm=True, left-padded generation",
)
def build_bloom_hub_post_ln():
    model = mf.bloom_model("BloomForCausalLM", 900, hidden_size=20, n_head=5,
                           apply_residual_connection_post_layernorm=True)
    ids, mask, sides = mf.make_batch(seed=91, seq_len=9, real_lengths=[9, 7, 4])
    inputs, arrays, meta = causal_lm_fixture(model, ids, mask, sides, ids, mask, 6, mf.bloom_meta({
        "config_style": "hub: n_embed (not hidden_size), num_attention_heads / num_hidden_layers (not n_head / "
                        "n_layer), keys without the 'transformer.' prefix",
    }), use_positions=False)
    meta["notes"] = [n.replace("apply_residual_connection_post_layernorm=False (residual is the pre-norm input)",
                               "apply_residual_connection_post_layernorm=True (residual is the NORMED input)")
                     for n in meta["notes"]] + ["n_head=5: slopes 2^(-2 * [1..4]) then 2^(-1)."]

    def save(folder):
        model.save_pretrained(folder, safe_serialization=True)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["n_embed"] = cfg.pop("hidden_size")
        cfg["num_attention_heads"] = cfg.pop("n_head")
        cfg["num_hidden_layers"] = cfg.pop("n_layer")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tensors = load_file(folder / "model.safetensors")
        save_file({k.removeprefix("transformer."): v.contiguous() for k, v in tensors.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})

    return dict(save=save, arrays=arrays, meta=meta, reload=mf.reload_checker(transformers.BloomForCausalLM, inputs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, r in EXTRA.items():
            print(f"{name:24s} {r['description']}")
        return
    mf.hf_logging.set_verbosity_error()
    mf.hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    problems = []
    for name in EXTRA:
        problems += mf.write_fixture(name, EXTRA[name]["fn"]())
        print(f"wrote {name}", file=sys.stderr)
    manifest = {"generator": "scripts/make_fixtures_extra.py", "transformers_version": transformers.__version__,
                "torch_version": torch.__version__,
                "fixtures": [{"name": n, "family": r["family"], "head": r["head"], "description": r["description"],
                              "path": f"tests/fixtures/{n}"} for n, r in EXTRA.items()]}
    mf.dump_json(manifest, mf.OUT / "MANIFEST_extra.json")
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()
