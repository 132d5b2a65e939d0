"""The stored form of the course's answers: loads every notebooks/solutions/*.py, and for each value
exercise prints the digest `minilm.course` stores; with --write, puts them into minilm/course.py
(after adding or changing an exercise). Function exercises store a property test, nothing to write.

    python scripts/course_answers.py            # print id, answer, digest; flag stale digests
    python scripts/course_answers.py --write    # refresh the digests in minilm/course.py
"""

import argparse
import importlib.util
import re
from pathlib import Path

from minilm import course

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "notebooks" / "solutions"
COURSE = ROOT / "minilm" / "course.py"


def load_answers():
    """{exercise id: answer} from every solutions file."""
    answers = {}
    for path in sorted(SOLUTIONS.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"solutions_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        answers.update(module.ANSWERS)
    return answers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the digests into minilm/course.py")
    args = parser.parse_args()
    answers = load_answers()
    text = COURSE.read_text()
    for exercise_id, exercise in sorted(course.EXERCISES.items()):
        if exercise.kind == "function":
            continue
        answer = answers[exercise_id]
        new = course.digest(exercise_id, exercise.kind, answer, exercise.tol, exercise.rtol)
        print(f"{exercise_id:18} {answer!r:40.40} {new}{'' if new == exercise.digest else '  (stale)'}")
        # the digest is the first 32-hex string after the id in its _value(...) call
        pattern = re.compile(rf'(_value\(\s*"{re.escape(exercise_id)}",.*?")([0-9a-f]{{32}})(")', re.DOTALL)
        text, count = pattern.subn(lambda m, new=new: m.group(1) + new + m.group(3), text, count=1)
        assert count == 1, f"no _value entry for {exercise_id} in {COURSE}"
    if args.write:
        COURSE.write_text(text)
        print(f"wrote {COURSE}")


if __name__ == "__main__":
    main()
