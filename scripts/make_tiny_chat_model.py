"""A second model to try offline: a tiny Gemma 3 that has read one page of text, with a real tokenizer.

    ~/.venvs/minilm-fixtures/bin/python scripts/make_tiny_chat_model.py   # about a minute

writes `tests/fixtures/tiny_chat/`, a Hugging Face folder that `python -m minilm --model
tests/fixtures/tiny_chat "..."` and `minilm.from_pretrained` read:

    config.json, model.safetensors   a Gemma3ForCausalLM (2 layers, hidden 64, sliding + full
                                     attention), trained by transformers for a few hundred steps on
                                     TEXT below, so that it continues it (it knows nothing else)
    tokenizer.json                   a byte-level BPE of 384 tokens trained on TEXT with the
                                     `tokenizers` library (any text encodes: bytes are the fallback)
    tokenizer_config.json            special tokens, add_bos_token, and Gemma's chat template
    reference.json                   transformers' greedy ids and text for PROMPTS: the oracle of
                                     tests/test_try_another_model.py

Deterministic (fixed seeds, one thread). Needs torch, transformers and tokenizers (the
`fixtures` extra; see scripts/README.md).
"""

import ast
import json
import shutil
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tiny_chat"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
VOCAB_SIZE = 384
STEPS = 400

TEXT = """\
Hello! I am a tiny language model. I have read one page of text, and this is the page.
A language model reads tokens and predicts the next token. The tokens come from a tokenizer,
which cuts text into pieces that it has seen often. Each token becomes a vector, the vectors go
through attention and a feed-forward network, layer after layer, and the last layer gives a score
to every token of the vocabulary. The largest score is the next token, and then it starts again.
Attention lets each token look at the tokens before it. Keys and values of the past are kept in a
cache, so the model does not read the whole text again for every new token.
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
Once upon a time, a student opened a small program and read it from top to bottom, next to the
paper. Every line had its shape written beside it, and the student understood the model.
"""
CHATS = [
    ("Hello", "Hello! I am a tiny language model."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is a token?", "A token is a piece of text that the tokenizer cut."),
]
PROMPTS = ["Hello", "The capital of France is", "Attention lets"]


def gemma_chat_template():
    """minilm's built-in Gemma template, read from its source (this environment need not import minilm)."""
    tree = ast.parse((ROOT / "minilm" / "io" / "chat_templates.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "GEMMA_CHAT_TEMPLATE":
            return ast.literal_eval(node.value)
    raise LookupError("GEMMA_CHAT_TEMPLATE not found")


def chat_text(user, model):
    return f"<bos><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n{model}<end_of_turn>\n"


def train_tokenizer():
    """A byte-level BPE (as GPT-2's, so no text is ever unknown) trained on the page and the chats."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT] + [chat_text(u, m) for u, m in CHATS], trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tokenizer


def training_ids(tokenizer):
    """The page (with <bos>) and each chat (its rendering holds its own <bos>), as one id list each."""
    rows = [tokenizer.encode(TEXT).ids]
    rows += [tokenizer.encode(chat_text(u, m), add_special_tokens=False).ids for u, m in CHATS]
    return rows


def train_model(tokenizer):
    torch.manual_seed(0)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIALS}
    config = transformers.Gemma3TextConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        tie_word_embeddings=True,
    )
    model = transformers.Gemma3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [torch.tensor([row]) for row in training_ids(tokenizer)]
    model.train()
    for step in range(STEPS):
        row = rows[step % len(rows)]
        loss = model(input_ids=row, labels=row).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()
    return model


def main():
    torch.set_num_threads(1)
    tokenizer = train_tokenizer()
    model = train_model(tokenizer)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    model.save_pretrained(OUT)
    (OUT / "generation_config.json").unlink(missing_ok=True)  # minilm reads config.json only
    (OUT / "model.safetensors").chmod(0o644)  # transformers writes it private (0600)
    tokenizer.save(str(OUT / "tokenizer.json"))
    settings = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": gemma_chat_template(),
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")
    eos = [tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<end_of_turn>")]
    cases = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt).ids
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos)
            new = out[0, len(ids) :].tolist()
            cases.append({"prompt": prompt, "prompt_ids": ids, "new_ids": new, "text": tokenizer.decode(new)})
            print(f"{prompt!r} -> {cases[-1]['text']!r}")
    reference = {
        "made_by": "scripts/make_tiny_chat_model.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "greedy": "transformers generate(max_new_tokens=16, do_sample=False), stopping at <eos> / <end_of_turn>",
        "cases": cases,
    }
    (OUT / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
