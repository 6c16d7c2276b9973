"""The command line's --help, readable: Lightning's texts replaced where mnist_lit means something else, and a list
of known subclasses too long to read replaced by the rule."""

from __future__ import annotations

import re
import shutil
import textwrap

from jsonargparse import DefaultHelpFormatter

# Options whose help is Lightning's, where mnist_lit means something else: the text shown instead.
OWN_HELP = {
    "--ckpt_path": "A checkpoint file, or 'last': the newest checkpoint in <trainer.default_root_dir>/checkpoints"
    " (--checkpoint.dirpath if given). fit resumes that run from it (fit also takes 'auto': resume the run if there"
    " is one, else start it); validate, test and predict use its weights. (default: null)",
    "--weights_only": "Not taken: mnist_lit reads every checkpoint as data (torch.load with weights_only) and verifies"
    " its digest; false is refused. (default: null)",
}
MAX_LISTED = 30  # known subclasses shown in an option's help; past that, how many and the rule


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, readable: Lightning's texts replaced where mnist_lit means something else (OWN_HELP), and
    a list of known subclasses too long to read (every nn.Module that happens to be imported: 300 of them) replaced
    by the rule. A whole help text is rewritten (format_help, argparse's public method), so each line is rewrapped."""

    def format_help(self) -> str:
        text = super().format_help()
        for option, help_text in OWN_HELP.items():
            text = re.sub(
                rf"(\n  {re.escape(option)} [^\n]*\n)((?: {{20,}}[^\n]*\n)+)",
                lambda m, h=help_text: m[1] + _wrapped(h, m[2]),
                text,
            )
        name = r"[\w.]+(?:\n *[\w.]+)*"  # a long name is broken over two lines
        width = shutil.get_terminal_size().columns - 2  # argparse's own width
        # their-words[jsonargparse.help]: its help's list of a class option's known subclasses
        pattern = rf" *known\s+subclasses:\s*((?:{name}\s*,\s*)+{name})(?=\))"
        return re.sub(pattern, lambda found: _shorter(found, width), text)


def _wrapped(text: str, like: str) -> str:
    indent = len(like) - len(like.lstrip(" "))
    width = max(len(line) for line in like.splitlines())
    return textwrap.fill(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent) + "\n"


def _shorter(found: re.Match, width: int) -> str:
    names = re.split(r"\s*,\s*", re.sub(r"\n *", "", found[1]))
    if len(names) <= MAX_LISTED:
        return found[0]
    rule = f"known subclasses: {len(names)} importable now, any of them by class path"
    return "\n" + textwrap.fill(rule, width, initial_indent=" " * 24, subsequent_indent=" " * 24)
