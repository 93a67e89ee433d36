"""One rule for prompts, in every stage (mine's teacher, train's student and guide, eval's models).

It is sentence-transformers' own convention:

- a prompt *name* (``query_prompt_name``, ``passage_prompt_name``) must be one of the model's saved prompts
  (``model.prompts``); a name the model lacks is an error that lists the names it has;
- a prompt *text* (``query_prompt``, ``passage_prompt``) is used as written (``""`` means no prompt);
- with neither, the model's own ``query`` prompt applies to queries and its ``document`` (else ``passage``)
  prompt to passages; a model without them gets no prompt.

Setting both the name and the text of one side is an error. The functions here are pure: they take the
model's prompt dictionary, never the model.
"""

from __future__ import annotations

from collections.abc import Mapping

from koret.errors import KoretError

QUERY_NAMES = ("query",)
PASSAGE_NAMES = ("document", "passage")


def resolve_prompt(prompts: Mapping[str, str], text: str | None, name: str | None, defaults: tuple[str, ...],
                   key: str) -> str:
    """The prompt text for one side; ``key`` is the config key prefix named in errors (``teacher.query``)."""
    if text is not None and name is not None:
        raise KoretError(f"{key}_prompt and {key}_prompt_name are both set", "set one: a text, or a prompt name")
    if name is not None:
        if name not in prompts:
            have = ", ".join(repr(n) for n in prompts) or "none"
            raise KoretError(f"{key}_prompt_name: {name!r} is not a prompt of this model (its prompts: {have})",
                             f"use one of them, or give the text with {key.rsplit('.', 1)[-1]}_prompt")
        return prompts[name]
    if text is not None:
        return text
    return next((prompts[n] for n in defaults if prompts.get(n)), "")


def resolve_prompts(prompts: Mapping[str, str] | None, section: object, key: str) -> tuple[str, str]:
    """(query prompt, passage prompt) from a config section with ``query_prompt``, ``query_prompt_name``,
    ``passage_prompt`` and ``passage_prompt_name`` (see :class:`koret.config.PromptFields`)."""
    prompts = dict(prompts or {})
    q = resolve_prompt(prompts, getattr(section, "query_prompt", None), getattr(section, "query_prompt_name", None),
                       QUERY_NAMES, f"{key}.query")
    p = resolve_prompt(prompts, getattr(section, "passage_prompt", None),
                       getattr(section, "passage_prompt_name", None), PASSAGE_NAMES, f"{key}.passage")
    return q, p


def saved_prompts(query_prompt: str, passage_prompt: str) -> dict[str, str]:
    """The prompts a trained model is saved with: exactly those it was trained with (none when none)."""
    out = {}
    if query_prompt:
        out["query"] = query_prompt
    if passage_prompt:
        out["document"] = passage_prompt
    return out
