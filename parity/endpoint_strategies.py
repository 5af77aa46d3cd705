"""Hypothesis strategies for the endpoint: SageMaker requests built from the feature lists (``features.json``) and
the model folder's category maps and defaults.

Hypothesis draws a :class:`RequestRecipe` (history length, which quirks are on, one mutation or none); the ~736
keys and up to 163 x 50 history elements are generated from the recipe's seed with :class:`random.Random`, so an
example stays cheap and shrinks towards a short, plain request. :func:`build_request` turns a recipe into the
request record (``body`` as sent, ``content_type``, ``accept``) and the outcome legacy-endpoint.md §3-§7 predicts
for it (:attr:`EndpointRequest.expect`): ``answer``, ``sanity`` (-1) or ``crash:<stage>:<exception type>``.

Valid requests cover: histories of 0 (a blank flag key) to 50 orders, blanks ("" and "My Text String") and the
lower-case "My text String", unknown categories, numerical categoricals as float strings / JSON numbers / JSON
bools / " 3e0 " / "false", JSON numbers for numerics, mismatched flag-key lengths (oldest or newest element
missing), cat and num groups of different lengths with shared or disjoint objectIds, equal lengths with disjoint
objectIds, future / blank / NaN current order dates, extreme values ("1e30", "1e308"), JSON null and NaN, extra
keys. Mutations (one per request) are the rows of legacy-endpoint.md §7 plus the sanity failures of §5.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from .endpoint import FEATURES, MODEL_DIR

MAX_HISTORY = 50  # legacy seq_len 51 - 1: more aligned rows crash (a mutation)
MAX_DATE_SPAN = 9_000_000  # history dates within this of the current order (the legacy refuses > 1e7)
BASE_DATE = 1_720_000_000
SEP = ";SEP;"

NUMCAT_STYLES = ("int", "float_str", "json_number", "json_bool", "spaced_exp", "false_string")
NUM_STYLES = ("str", "json")
FLAG_MISMATCH = (None, "oldest_missing", "newest_missing")
GROUP_MISMATCH = (None, "num_shorter_shared", "cat_shorter_shared", "disjoint_lengths", "same_length_disjoint")
DATES = (None, "future_history", "blank_current", "nan_current", "old_history", "blank_history", "delta_exactly_1e7")
EXTREMES = (None, "1e30", "1e308", "-1e30", "nan_string", "nan_json", "null_numeric", "null_category",
            "dict_category", "json_numbers_everywhere")
# (name, the outcome legacy-endpoint.md §5 / §7 gives it); ordered simplest first
MUTATIONS = (
    ("missing_key", "sanity"),
    ("non_dict", "sanity"),
    ("content_type_charset", "crash:input_fn:ValueError"),
    ("content_type_csv", "crash:input_fn:ValueError"),
    ("content_type_none", "crash:input_fn:ValueError"),
    ("invalid_json", "crash:input_fn:JSONDecodeError"),
    ("accept_csv", "crash:output_fn:ValueError"),
    ("flag_not_string", "crash:predict_fn:AttributeError"),
    ("numcat_current_text", "crash:predict_fn:ValueError"),
    ("numcat_current_nan", "crash:predict_fn:ValueError"),
    ("numcat_current_inf", "crash:predict_fn:OverflowError"),
    ("numcat_current_null", "crash:predict_fn:TypeError"),
    ("numcat_current_lowercase_mts", "crash:predict_fn:ValueError"),
    ("numcat_history_mts", "crash:predict_fn:ValueError"),
    ("numcat_history_false", "crash:predict_fn:ValueError"),
    ("numcat_history_inf", "crash:predict_fn:OverflowError"),
    ("history_not_string", "crash:predict_fn:AttributeError"),
    ("ragged_cat", "crash:predict_fn:ValueError"),
    ("ragged_num", "crash:predict_fn:ValueError"),
    ("blank_without_default", "crash:predict_fn:KeyError"),
    ("list_value", "crash:predict_fn:ValueError"),
    ("dict_numeric", "crash:predict_fn:TypeError"),
    ("history_too_long", "crash:predict_fn:ValueError"),
    ("numeric_text", "crash:predict_fn:ValueError"),
    ("numeric_space", "crash:predict_fn:ValueError"),
    ("numeric_json_bool", "crash:predict_fn:ValueError"),
    ("numeric_history_text", "crash:predict_fn:ValueError"),
    ("dense_text", "crash:predict_fn:ValueError"),
    ("dense_text_bad_date", "sanity"),
    ("unmapped_negative", "crash:predict_fn:IndexError"),
    ("unmapped_too_big", "crash:predict_fn:IndexError"),
    ("bad_date", "sanity"),
)
MUTATION_NAMES = tuple(m for m, _ in MUTATIONS)
SANITY_DATES = ("old_history", "blank_history")
PASSING_DATES = tuple(d for d in DATES if d not in SANITY_DATES)
# mutations whose fault shows whatever the dates: the request fails before (or without) the orderDate check
BEFORE_DATE_CHECK = ("missing_key", "non_dict", "content_type_charset", "content_type_csv", "content_type_none",
                     "invalid_json", "accept_csv", "flag_not_string", "numcat_current_text", "numcat_current_nan",
                     "numcat_current_inf", "numcat_current_null", "numcat_current_lowercase_mts",
                     "numcat_history_mts", "numcat_history_false", "numcat_history_inf", "history_not_string",
                     "blank_without_default", "list_value", "dict_numeric", "numeric_text", "numeric_space",
                     "numeric_json_bool")
# mutations planted in one history sequence: no truncation, no intersection, dates as generated
PLAIN_HISTORY = ("ragged_cat", "ragged_num", "history_too_long", "bad_date", "dense_text_bad_date",
                 "numeric_history_text")
NEEDS_HISTORY = {"numcat_history_mts", "numcat_history_false", "numcat_history_inf", "history_not_string",
                 "ragged_cat", "ragged_num", "history_too_long", "numeric_history_text", "bad_date",
                 "dense_text_bad_date"}


@dataclass(frozen=True)
class RequestRecipe:
    seed: int
    history: int = 5  # orders of history; 0 = a blank flag key (no history)
    blank_rate: float = 0.0
    unknown_rate: float = 0.0
    numcat_style: str = "int"
    num_style: str = "str"
    flag_mismatch: str | None = None
    group_mismatch: str | None = None
    dates: str | None = None
    extreme: str | None = None
    lowercase_mts: bool = False
    extra_keys: bool = False
    mutation: str | None = None

    def short(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v not in (None, False, 0.0) or k in ("seed", "history")}
        return ", ".join(f"{k}={v!r}" for k, v in d.items())


@dataclass(frozen=True)
class EndpointRequest:
    body: Any  # str (as sent)
    content_type: Any
    accept: Any
    expect: str  # "answer", "sanity", "crash:<stage>:<type>", or "answer|nan" (a NaN score is allowed)
    recipe: RequestRecipe

    def record(self) -> dict:
        return {"body": self.body, "content_type": self.content_type, "accept": self.accept}


class RequestBuilder:
    """The feature lists and the model folder's maps and defaults, and :meth:`build` (recipe -> request)."""

    def __init__(self, features: dict, cat_to_index: dict, defaults: dict, scalers: dict | None = None):
        self.F = features
        self.maps = cat_to_index
        self.defaults = defaults
        F = features
        self.sep = F.get("SEP", SEP)
        self.cat_vars = list(F["seq_cat_vars"])
        self.num_vars = list(F["seq_num_vars"])
        self.dense_vars = list(F["dense_num_vars"])
        self.numcat = {F["seq_cat_vars"][i] for i in F["numerical_cat_vars_indices"]}
        self.flag_keys = tuple(F["handler"]["no_history_keys"])
        self.cat_otf = dict(zip(F["input_data_seq_cat_vars"], F["input_data_seq_cat_otf_vars"]))
        self.flag_vars = {v for v, otf in self.cat_otf.items() if otf in self.flag_keys}
        self.num_otf = dict(zip(F["input_data_seq_num_vars"], F["input_data_seq_num_otf_vars"]))
        every = set(F["input_data_seq_cat_vars"]) | set(F["input_data_seq_num_vars"]) | set(F["input_data_dense_num_vars"])
        self.no_default = sorted(v for v in every if v not in defaults)
        self.null_default = sorted(v for v in every if v in defaults and defaults[v] is None)  # blank -> NaN
        self.unmapped = [v for v in self.cat_vars if v not in self.maps]
        self.unmapped_numcat = [v for v in self.unmapped if v in self.numcat]
        self.mapped_plain_cat = [v for v in self.cat_vars if v in self.maps and v not in self.numcat]
        # raw ranges that the min-max scalers map to about [-0.1, 1.1] (x * scale + min), per variable
        self.ranges: dict[str, tuple[float, float]] = {}
        if scalers is not None:
            deleted = set(F["handler"].get("num_static_deleted_indices", ()))
            static = [j for j in range(len(scalers["num_static_scale_"])) if j not in deleted]
            pairs = list(zip(self.num_vars, zip(scalers["seq_num_scale_"], scalers["seq_num_min_"])))
            pairs += [(v, (scalers["num_static_scale_"][j], scalers["num_static_min_"][j]))
                      for v, j in zip(self.dense_vars, static)]
            for var, (scale, mn) in pairs:
                if scale:
                    self.ranges[var] = (float((-0.1 - mn) / scale), float((1.1 - mn) / scale))

    @classmethod
    def from_files(cls, model_dir: str | Path = MODEL_DIR, features: str | Path = FEATURES) -> RequestBuilder:
        from reference import safe_pickle

        model_dir = Path(model_dir)
        scalers = safe_pickle.load(model_dir / "preprocessor.pkl", "preprocessor")
        return cls(json.loads(Path(features).read_text()), json.loads((model_dir / "cat_to_index.json").read_text()),
                   json.loads((model_dir / "default_value_dict.json").read_text()), scalers)

    @cached_property
    def usable_mutations(self) -> tuple[str, ...]:
        out = []
        for m in MUTATION_NAMES:
            if m == "blank_without_default" and not self.no_default:
                continue
            if m in ("unmapped_negative", "unmapped_too_big") and not self.unmapped_numcat:
                continue
            out.append(m)
        return tuple(out)

    # --- value generators ---------------------------------------------------------------------------------
    def _category(self, rng: random.Random, var: str, recipe: RequestRecipe, current: bool) -> Any:
        if var in self.numcat:
            keys = list(self.maps.get(var, {})) or ["0", "1", "2"]
            ints = [k for k in keys if _is_int(k)] or ["0"]
            k = int(rng.choice(ints))
            if var not in self.maps:  # unmapped: the raw integer is an embedding row, keep it small and >= 0
                k = abs(k) % 5
            style = recipe.numcat_style
            if not current:  # history elements are strings; only "" is exempt there
                return f"{k}.0" if style in ("float_str", "json_number") and rng.random() < 0.5 else str(k)
            if style == "float_str":
                return f"{k}.0" if rng.random() < 0.7 else f"{k}.{rng.randint(0, 9)}" if k >= 0 else str(k)
            if style == "json_number":
                return float(k) if rng.random() < 0.5 else k
            if style == "json_bool" and k in (0, 1):
                return bool(k)
            if style == "spaced_exp":
                return f" {k}e0 "
            if style == "false_string" and var in self.maps and rng.random() < 0.3:
                return "false"  # (in an unmapped column "false" stays raw text and int() refuses it)
            return str(k)
        if rng.random() < recipe.unknown_rate:
            return f"UNSEEN_{rng.randint(0, 99)}"
        keys = list(self.maps.get(var, {}))
        return rng.choice(keys) if keys else str(rng.randint(0, 5))

    def _number(self, rng: random.Random, var: str, recipe: RequestRecipe, current: bool) -> Any:
        lo, hi = self.ranges.get(var, (-5.0, 3000.0))
        x = round(rng.uniform(lo, hi), rng.choice((0, 1, 2, 3, 4)))
        if current and recipe.num_style == "json":
            return x
        return repr(x) if rng.random() < 0.8 else str(int(x))

    def _blank(self, rng: random.Random, var: str, recipe: RequestRecipe, is_current: bool) -> Any | None:
        """A blank for ``var`` (or None: not blank). Never for a variable without a default."""
        if var in self.no_default or rng.random() >= recipe.blank_rate:
            return None
        if var in self.null_default and recipe.blank_rate < 0.3:
            return None  # blank -> null default -> a NaN score: only at the highest blank rate
        return "" if rng.random() < 0.6 else "My Text String"

    # --- the request ----------------------------------------------------------------------------------
    def build(self, recipe: RequestRecipe) -> EndpointRequest:
        rng = random.Random(recipe.seed)
        m = recipe.mutation
        n = recipe.history
        if m == "history_too_long":
            n = MAX_HISTORY + 1 + rng.randint(0, 3)
        has_history = n > 0
        expect = dict(MUTATIONS).get(m, "answer")
        if recipe.blank_rate >= 0.3 and self.null_default:
            expect = _nan_ok(expect)  # a blank numeric whose default is null scores NaN
        body: dict[str, Any] = {}

        # current order
        date = BASE_DATE + rng.randint(0, 10_000_000)
        for var in self.cat_vars:
            b = self._blank(rng, var, recipe, True)
            body[var] = b if b is not None else self._category(rng, var, recipe, True)
        for var in self.num_vars:
            b = self._blank(rng, var, recipe, True)
            body[var] = b if b is not None else self._number(rng, var, recipe, True)
        for var in self.dense_vars:
            b = self._blank(rng, var, recipe, True)
            body[var] = b if b is not None else self._number(rng, var, recipe, True)
        body["orderDate"] = str(date) if recipe.num_style == "str" else date
        if recipe.lowercase_mts:  # not blank: an unknown category (or, in a numerical categorical, a crash)
            body[rng.choice(self.mapped_plain_cat)] = "My text String"

        # history (oldest first); row count per group
        rows_cat = rows_num = max(n, 1)
        ids = [_object_id(rng) for _ in range(rows_cat)]
        ids_num = list(ids)
        gm = recipe.group_mismatch if has_history and n >= 2 else None
        if gm == "num_shorter_shared":
            keep = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
            ids_num = [ids[i] for i in keep]
        elif gm == "cat_shorter_shared":
            keep = sorted(rng.sample(range(n), rng.randint(1, n - 1)))
            ids_num, ids = ids, [ids[i] for i in keep]
        elif gm == "disjoint_lengths":
            ids_num = [_object_id(rng) for _ in range(n - 1)]
        elif gm == "same_length_disjoint":
            ids_num = [_object_id(rng) for _ in range(n)]
        rows_cat, rows_num = len(ids), len(ids_num)
        gaps = sorted(rng.randint(1, MAX_DATE_SPAN) for _ in range(max(rows_cat, rows_num)))[::-1]
        dates = [str(date - g) for g in gaps]  # oldest first
        dates_cat, dates_num = dates[-rows_cat:], dates[-rows_num:]

        def cat_seq(var: str, count: int) -> list[str]:
            out = []
            for _ in range(count):
                # a blank flag-key history would switch history off (the flag tests the whole string)
                b = None if var in self.flag_vars else self._blank(rng, var, recipe, False)
                out.append("" if b is not None and var in self.numcat else b if b is not None
                           else str(self._category(rng, var, recipe, False)))
            return out

        def num_seq(var: str, count: int) -> list[str]:
            out = []
            for _ in range(count):
                b = self._blank(rng, var, recipe, False)
                out.append(b if b is not None else str(self._number(rng, var, recipe, False)))
            return out

        for var, otf in self.cat_otf.items():
            if var == "orderDate":
                seq = dates_cat
            elif var == "objectId":
                seq = ids
            else:
                seq = cat_seq(var, rows_cat)
            body[otf] = seq
        for var, otf in self.num_otf.items():
            if var == "orderDate":
                seq = dates_num
            elif var == "objectId":
                seq = ids_num
            else:
                seq = num_seq(var, rows_num)
            body[otf] = seq

        # the two flag keys decide "no history"; their element counts decide the truncation
        k1, k2 = self.flag_keys
        if not has_history:
            blank_key = rng.choice((k1, k2))
            body[blank_key] = ["" if rng.random() < 0.5 else "My Text String"]
        fm = recipe.flag_mismatch if has_history and n >= 2 and gm is None else None
        if fm == "oldest_missing":
            body[k1] = body[k1][1:]
        elif fm == "newest_missing":
            body[k1] = body[k1][:-1]

        # dates
        dmode = recipe.dates if m not in ("bad_date", "dense_text_bad_date") else "old_history"
        num_date_key = self.num_otf["orderDate"]
        if dmode == "future_history" and has_history:
            body[num_date_key] = [str(date + rng.randint(1, 10**6)) for _ in body[num_date_key]]
        elif dmode == "blank_current" and "orderDate" not in self.no_default:
            body["orderDate"] = ""
            expect = _nan_ok(expect)
        elif dmode == "nan_current":
            body["orderDate"] = "nan" if rng.random() < 0.5 else float("nan")
            expect = _nan_ok(expect)
        elif dmode == "old_history" and has_history:
            seq = body[num_date_key]  # the newest row: no truncation or intersection drops it
            seq[-1] = str(date - 10_000_001 - rng.randint(0, 10**8))
            if expect in ("answer", "answer|nan"):
                expect = "sanity"
        elif dmode == "blank_history" and has_history and "orderDate" not in self.no_default:
            seq = body[num_date_key]
            seq[-1] = ""
            if expect in ("answer", "answer|nan") and _as_float(self.defaults["orderDate"]) < date - 10_000_000:
                expect = "sanity"
        elif dmode == "delta_exactly_1e7" and has_history:
            body[num_date_key][0] = str(date - 10_000_000)

        # extreme values and JSON null / NaN (current order)
        ex = recipe.extreme
        if ex in ("1e30", "1e308", "-1e30"):
            body[rng.choice(self.num_vars)] = ex
            body[rng.choice(self.dense_vars)] = float(ex)
            expect = _nan_ok(expect)
        elif ex == "nan_string":
            body[rng.choice(self.num_vars)] = "nan"
            expect = _nan_ok(expect)
        elif ex == "nan_json":
            body[rng.choice(self.dense_vars)] = float("nan")
            expect = _nan_ok(expect)
        elif ex == "null_numeric":
            body[rng.choice(self.num_vars + self.dense_vars)] = None
            expect = _nan_ok(expect)
        elif ex == "null_category":
            body[rng.choice(self.mapped_plain_cat)] = None
        elif ex == "dict_category":
            body[rng.choice(self.mapped_plain_cat)] = {"a": 1}
        elif ex == "json_numbers_everywhere":
            for var in rng.sample(self.mapped_plain_cat, min(5, len(self.mapped_plain_cat))):
                body[var] = rng.choice((3, 1.5, True))

        if recipe.extra_keys:
            body["someOtherKey"] = "x"
            body["objectId"] = "sent-but-overwritten"

        self._mutate(rng, body, m)
        # histories -> SEP-joined strings (mutations may have left a non-string on purpose)
        for otf in list(self.cat_otf.values()) + list(self.num_otf.values()):
            value = body.get(otf)
            if isinstance(value, list) and all(isinstance(x, str) for x in value):
                body[otf] = self.sep.join(value)

        content_type, accept = "application/json", "application/json"
        if m == "content_type_charset":
            content_type = "application/json; charset=utf-8"
        elif m == "content_type_csv":
            content_type = "text/csv"
        elif m == "content_type_none":
            content_type = None
        elif m == "accept_csv":
            accept = "text/csv"
        if m == "non_dict":
            text = json.dumps(rng.choice(([1, 2, 3], "hello", 42, None)))
        elif m == "invalid_json":
            text = "{not json"
        else:
            text = json.dumps(body)
        return EndpointRequest(text, content_type, accept, expect, recipe)

    def _mutate(self, rng: random.Random, body: dict, m: str | None) -> None:
        if m is None:
            return
        F = self.F
        numcat = sorted(self.numcat)
        if m == "missing_key":
            lists = [F[k] for k in ("input_data_seq_cat_otf_vars", "input_data_seq_cat_vars", "input_data_seq_num_otf_vars",
                                    "input_data_seq_num_vars", "input_data_dense_num_vars")]
            key = rng.choice([k for k in rng.choice(lists) if k != "objectId"])
            body.pop(key, None)
        elif m == "flag_not_string":
            body[rng.choice(self.flag_keys)] = rng.choice((5, None, [1, 2]))
        elif m.startswith("numcat_current_"):
            body[rng.choice(numcat)] = {"numcat_current_text": "abc", "numcat_current_nan": "nan",
                                        "numcat_current_inf": "inf", "numcat_current_null": None,
                                        "numcat_current_lowercase_mts": "My text String"}[m]
        elif m.startswith("numcat_history_"):
            seq = body[self.cat_otf[rng.choice(numcat)]]
            seq[rng.randrange(len(seq))] = {"numcat_history_mts": "My Text String", "numcat_history_false": "false",
                                            "numcat_history_inf": "inf"}[m]
        elif m == "history_not_string":
            var = rng.choice([v for v in self.num_vars])
            body[self.num_otf[var]] = rng.choice((7, None))
        elif m == "ragged_cat":
            body[self.cat_otf[rng.choice([v for v in self.cat_vars if v not in self.flag_keys])]].append("1")
        elif m == "ragged_num":
            body[self.num_otf[rng.choice(self.num_vars)]].append("1.5")
        elif m == "blank_without_default":
            body[rng.choice(self.no_default)] = ""
        elif m == "list_value":
            # (in a numerical categorical float() would refuse the list first: TypeError)
            body[rng.choice([v for v in self.cat_vars if v not in self.numcat] + self.num_vars + self.dense_vars)] = [1, 2]
        elif m == "dict_numeric":
            body[rng.choice(self.num_vars + self.dense_vars)] = {"a": 1}
        elif m == "numeric_text":
            body[rng.choice(self.num_vars)] = "abc"
        elif m == "numeric_space":
            body[rng.choice(self.num_vars)] = " "
        elif m == "numeric_json_bool":
            body[rng.choice(self.num_vars)] = rng.choice((True, False))
        elif m == "numeric_history_text":
            seq = body[self.num_otf[rng.choice(self.num_vars)]]
            seq[rng.randrange(len(seq))] = "abc"
        elif m in ("dense_text", "dense_text_bad_date"):
            body[rng.choice(self.dense_vars)] = "abc"
        elif m == "unmapped_negative":
            body[rng.choice(self.unmapped_numcat)] = str(-rng.randint(1, 5))
        elif m == "unmapped_too_big":
            body[rng.choice(self.unmapped_numcat)] = str(int(self.F["handler"]["model_args"]["n_embedding"]) + 2 +
                                                         rng.randint(0, 100))


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _nan_ok(expect: str) -> str:
    return "answer|nan" if expect == "answer" else expect


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _object_id(rng: random.Random) -> str:
    return f"{rng.randint(100, 999)}-{rng.randint(0, 9999999):07d}-{rng.randint(0, 9999999):07d}"


def request_recipes(builder: RequestBuilder, mutations: bool = True) -> st.SearchStrategy[RequestRecipe]:
    """Recipes: mostly valid requests with their quirks; with ``mutations``, a third carry one mutation."""
    mutation = st.none()
    if mutations:
        mutation = st.one_of(st.none(), st.none(), st.sampled_from(builder.usable_mutations))

    @st.composite
    def recipe(draw):
        m = draw(mutation, label="mutation")
        history = draw(st.integers(0, MAX_HISTORY), label="history")
        if m in NEEDS_HISTORY and history == 0:
            history = 1
        if m in PLAIN_HISTORY:
            flag_mismatch, group_mismatch, dates = None, None, None  # keep the one fault the mutation plants
        else:
            flag_mismatch = draw(_mostly_none(FLAG_MISMATCH, 2), label="flag_mismatch")
            group_mismatch = draw(_mostly_none(GROUP_MISMATCH, 2), label="group_mismatch")
            dates = draw(_mostly_none(DATES if m in (None, *BEFORE_DATE_CHECK) else PASSING_DATES, 8), label="dates")
            if dates in SANITY_DATES:
                group_mismatch = None  # the bad row is the newest: no intersection may drop it
        extreme = draw(_mostly_none(EXTREMES, 10), label="extreme") if m is None else None
        return RequestRecipe(
            seed=draw(st.integers(0, 2**31 - 1), label="seed"),
            history=history,
            blank_rate=draw(st.sampled_from((0.0, 0.05, 0.3)), label="blank_rate"),
            unknown_rate=draw(st.sampled_from((0.0, 0.05, 0.3)), label="unknown_rate"),
            numcat_style=draw(st.sampled_from(NUMCAT_STYLES), label="numcat_style"),
            num_style=draw(st.sampled_from(NUM_STYLES), label="num_style"),
            flag_mismatch=flag_mismatch, group_mismatch=group_mismatch, dates=dates, extreme=extreme,
            lowercase_mts=draw(st.booleans(), label="lowercase_mts") if m is None else False,
            extra_keys=draw(st.booleans(), label="extra_keys"),
            mutation=m)

    return recipe()


def _mostly_none(choices: tuple, weight: int) -> st.SearchStrategy:
    """``choices`` (None first) with None ``weight`` times as likely as each other choice; shrinks to None."""
    return st.sampled_from((None,) * weight + tuple(c for c in choices if c is not None))


def outcome_matches(expect: str, kind: str) -> bool:
    """Does an outcome kind (:attr:`parity.endpoint.Outcome.kind`) fulfil a recipe's expectation?"""
    if expect == "answer|nan":
        return kind in ("score", "nan")
    if expect == "answer":
        return kind == "score"
    return kind == expect
