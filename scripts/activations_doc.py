"""Write the tables of docs/activations.md from the code: `python scripts/activations_doc.py`.

Each family's table sits between `<!-- names: FIXTURE -->` and `<!-- end -->`; it is
`minilm.activations.names_table` of that family's tiny causal-LM fixture (the names are the same
for every size of the family). tests/test_capture.py checks that the file is up to date."""

import re
from pathlib import Path

import minilm
from minilm.activations import names_table

REPO = Path(__file__).parent.parent
DOC = REPO / "docs" / "activations.md"
FAMILIES = ["gemma3_causal_lm", "qwen3_moe_causal_lm", "bloom_causal_lm", "phi3_causal_lm"]


def main():
    text = DOC.read_text()
    for name in FAMILIES:
        table = names_table(minilm.from_pretrained(REPO / "tests" / "fixtures" / name))
        text, count = re.subn(
            rf"(<!-- names: {name} -->\n).*?(<!-- end -->)",
            lambda m, table=table: m.group(1) + table + m.group(2),
            text,
            flags=re.S,
        )
        assert count == 1, f"{DOC} needs one '<!-- names: {name} -->' ... '<!-- end -->' section"
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
