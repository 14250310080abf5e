"""lm-eval tasks whose requests are built once and answered again for every candidate.

``lm_eval.evaluator.evaluate`` rebuilds every task's request ``Instance``s on
each call: it renders each document's prompt (a Jinja template compiled per
document), samples its few-shot context and constructs the requests, work that
does not depend on the model. During a search that is most of lm-eval's cost
per candidate on small models. ``PreparedTasks`` runs the same steps as
``evaluate`` with lm-eval's own objects, split where the candidate starts to
matter: ``build_all_requests`` once per worker; per candidate only the model's
``loglikelihood`` / ``generate_until`` over the kept ``Instance``s, then the
task's filters, ``process_results`` and aggregation, as ``evaluate`` applies
them. ``process_results`` renders each document's target (and choices) again,
one Jinja compile each; those renderings are kept per document too, and
``wrap_model`` gives the live model an ``HFLM`` that tokenizes each request
string once (HFLM re-tokenizes every request on every call, twice for
``generate_until``). The scores equal ``simple_evaluate``'s (tests check it).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

#: ``simple_evaluate``'s default few-shot seed, so few-shot contexts equal its own.
FEWSHOT_SEED = 1234
#: Task methods that render a document and that ``process_results`` calls for every candidate.
DOC_RENDERERS = ("doc_to_target", "doc_to_choice")


def wrap_model(model, tokenizer, batch_size: int):
    """One lm-eval ``HFLM`` around the live ``model`` (its weights change in place per candidate)."""
    return _token_memo_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@functools.cache
def _token_memo_hflm():
    """``HFLM`` whose tokenizations are memoized: the request strings are the same for every candidate."""
    from lm_eval.models.huggingface import HFLM

    class TokenMemoHFLM(HFLM):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._encoded: dict[tuple, list[int]] = {}
            self._batches: dict[tuple, tuple[Any, Any]] = {}

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
            if key not in self._encoded:
                self._encoded[key] = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            return list(self._encoded[key])  # callers own their copy

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            if key not in self._batches:
                self._batches[key] = super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            ids, mask = self._batches[key]
            return ids.clone(), mask.clone()

    return TokenMemoHFLM


class PreparedTasks:
    """lm-eval tasks with their request ``Instance``s built once; ``score`` answers them for the model as it is now.

    ``tasks`` maps task names to configured lm-eval ``Task`` objects (split and
    ``num_fewshot`` already set); ``limit`` is ``evaluate``'s (a count, or a
    fraction below 1).
    """

    def __init__(self, tasks: dict[str, Any], limit: float | None = None) -> None:
        from lm_eval.evaluator_utils import get_sample_size

        self.tasks = tasks
        self._docs: dict[str, list[tuple[int, Any]]] = {}
        self._by_doc: dict[str, dict[int, list]] = {}
        #: request type -> the instances of every task, each ``repeats`` times (one model call per type)
        self._requests: dict[str, list] = defaultdict(list)
        for name, task in tasks.items():
            for method in DOC_RENDERERS:
                _render_once_per_doc(task, method)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
            n = get_sample_size(task, limit)
            task.build_all_requests(limit=n, rank=0, world_size=1)
            self._docs[name] = list(task.doc_iterator(rank=0, limit=n, world_size=1))
            by_doc: dict[int, list] = defaultdict(list)
            for instance in task.instances:
                by_doc[instance.doc_id].append(instance)
                self._requests[instance.request_type].extend([instance] * instance.repeats)
            for instances in by_doc.values():
                instances.sort(key=lambda inst: inst.idx)
            self._by_doc[name] = by_doc

    @property
    def num_requests(self) -> int:
        """Model calls per candidate (requests times repeats)."""
        return sum(len(reqs) for reqs in self._requests.values())

    def score(self, lm) -> dict[str, dict[str, Any]]:
        """Answer every request with ``lm`` and return each task's aggregated metrics.

        Keys are lm-eval's ``"metric,filter"`` (plus ``"metric_stderr,filter"``
        set to ``"N/A"``: no bootstrap during a search), as in ``evaluate``'s results.
        """
        from lm_eval.evaluator_utils import _compute_task_aggregations

        for task in self.tasks.values():
            for instance in task.instances:  # the previous candidate's answers
                instance.resps = []
                instance.filtered_resps = {}
        for request_type, requests in self._requests.items():
            answers = getattr(lm, request_type)(requests, disable_tqdm=True)
            for answer, request in zip(answers, requests, strict=True):
                request.resps.append(answer)
        results: dict[str, dict[str, Any]] = {}
        for name, task in self.tasks.items():
            task.apply_filters()
            raw: dict[tuple[str, str], list] = defaultdict(list)
            by_doc = self._by_doc[name]
            for filter_key in task.instances[0].filtered_resps:
                for doc_id, doc in self._docs[name]:
                    answers = [inst.filtered_resps[filter_key] for inst in by_doc[doc_id]]
                    for metric, value in task.process_results(doc, answers).items():
                        raw[(metric, filter_key)].append(value)
            results[name], _ = _compute_task_aggregations(task, raw, bootstrap_iters=0)
        return results


def _render_once_per_doc(task, method: str) -> None:
    """Shadow ``task.<method>(doc)`` with a per-document memo (renderings depend on the document only).

    Keyed by the document object, which the memo keeps alive so its id is never
    reused; calls with extra arguments go to lm-eval unchanged.
    """
    render = getattr(task, method)
    memo: dict[int, tuple[Any, Any]] = {}

    def once(doc, *args, **kwargs):
        if args or kwargs:
            return render(doc, *args, **kwargs)
        hit = memo.get(id(doc))
        if hit is None:
            hit = memo[id(doc)] = (doc, render(doc))
        return hit[1]

    setattr(task, method, once)
