"""A longer fuzzing run than CI's: every fuzz test of the suite with many more inputs, then a
tally of what happened to them (read, or the error type minilm raised; anything else fails the
test and is printed by pytest).

    python scripts/fuzz.py                # 5 000 inputs per fuzzer (GGUF and safetensors headers;
                                          # half for config.json, a third for vocabularies)
    python scripts/fuzz.py --examples 20000

CI runs the same tests with MINILM_FUZZ_EXAMPLES unset (300).
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ_TESTS = [
    "tests/test_gguf.py::test_fuzzed_headers_give_checkpoint_errors",
    "tests/test_errors.py::test_fuzzed_safetensors_give_checkpoint_errors",
    "tests/test_errors.py::test_fuzzed_config_json_gives_minilm_errors",
    "tests/test_tokenizer.py::test_fuzzed_vocabulary_metadata",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="inputs per fuzzer")
    args = parser.parse_args()
    os.environ["MINILM_FUZZ_EXAMPLES"] = str(args.examples)  # read when conftest is imported
    sys.path.insert(0, str(ROOT / "tests"))
    import pytest  # after the environment is set

    code = pytest.main(["-q", "-p", "no:cacheprovider", *[str(ROOT / t) for t in FUZZ_TESTS]])
    from conftest import FUZZ_TALLY

    print(f"\n{'fuzzer':14s} {'inputs':>7s}  outcomes")
    for name, tally in FUZZ_TALLY.items():
        outcomes = ", ".join(f"{kind} {count}" for kind, count in tally.most_common())
        print(f"{name:14s} {sum(tally.values()):7d}  {outcomes}")
    print("crashes: none" if code == 0 else "a fuzz test failed: see pytest's report above")
    return code


if __name__ == "__main__":
    sys.exit(main())
