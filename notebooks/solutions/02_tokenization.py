"""Solutions to the exercises of notebooks/02_tokenization (for teachers)."""

import minilm


def bpe(word, vocab):
    pieces = list(word)
    while True:
        candidates = [
            (vocab[left + right], i)
            for i, (left, right) in enumerate(zip(pieces, pieces[1:], strict=False))
            if left + right in vocab
        ]
        if not candidates:
            return pieces
        _, i = min(candidates)  # lowest id, then leftmost
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]


_, tokenizer = minilm.api.load(backend="numpy")  # loaded once per process

ANSWERS = {
    "tokenization.1": bpe,
    "tokenization.2": len(tokenizer.encode("\U00013000", add_bos=False)),
    "tokenization.3": len(tokenizer.encode("<start_of_turn>user", add_bos=False)),
}
