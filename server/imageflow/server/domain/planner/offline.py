"""The deterministic offline planner: SudachiPy splits the instruction into clauses, a lexicon maps each clause
to catalog operations and their parameters (numbers, units, directions, colours, classes), and order and
parallel words shape the graph."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from imageflow.common.errors import invalid_argument
from imageflow.common.structs import dict_to_struct, struct_to_dict
from imageflow.server.domain.planner.guard import CAPABILITIES, normalise, out_of_scope
from imageflow.server.domain.planner.service import Draft
from imageflow.server.domain.tool_records import RegisteredTool
from imageflow.v1 import pipeline_pb2
from sudachipy import Dictionary, SplitMode

NUMBER = r"(\d+(?:\.\d+)?)"

CLASS_WORDS: list[tuple[str, str]] = sorted(
    [
        ("歩行者", "person"), ("人物", "person"), ("人間", "person"), ("人々", "person"), ("人", "person"),
        ("ひと", "person"), ("person", "person"), ("people", "person"),
        ("顔", "face"), ("face", "face"), ("かお", "face"),
        ("自転車", "bicycle"), ("bicycle", "bicycle"), ("バイシクル", "bicycle"),
        ("自動車", "car"), ("乗用車", "car"), ("クルマ", "car"), ("くるま", "car"), ("car", "car"), ("車", "car"),
        ("車両", "vehicle"), ("乗り物", "vehicle"), ("vehicle", "vehicle"),
        ("犬", "dog"), ("いぬ", "dog"), ("イヌ", "dog"), ("dog", "dog"), ("ワンちゃん", "dog"), ("わんちゃん", "dog"),
        ("ワンコ", "dog"), ("わんこ", "dog"), ("子犬", "dog"),
        ("猫", "cat"), ("ねこ", "cat"), ("ネコ", "cat"), ("cat", "cat"), ("ニャンコ", "cat"), ("にゃんこ", "cat"),
        ("子猫", "cat"),
        ("椅子", "chair"), ("いす", "chair"), ("イス", "chair"), ("ボトル", "bottle"), ("瓶", "bottle"),
        ("ノートパソコン", "laptop"), ("ラップトップ", "laptop"), ("マグカップ", "mug"), ("マグ", "mug"),
        ("コーヒーカップ", "coffee cup"), ("カメラ", "camera"), ("本", "book"), ("書籍", "book"), ("机", "desk"),
        ("テーブル", "table"), ("牛", "cattle"), ("ブーツ", "boot"), ("靴", "footwear"), ("箱", "box"),
        ("モニター", "computer monitor"), ("ディスプレイ", "computer monitor"), ("マウス", "computer mouse"),
        ("ハイヒール", "high heels"),
    ],
    key=lambda pair: -len(pair[0]),
)  # fmt: skip

COLOR_WORDS: list[tuple[str, str]] = [
    ("オレンジ", "orange"), ("ピンク", "pink"), ("水色", "cyan"), ("紫", "purple"), ("黄色", "yellow"), ("黄", "yellow"),
    ("緑", "green"), ("青", "blue"), ("赤", "red"), ("白", "white"), ("黒", "black"), ("灰色", "gray"), ("グレー", "gray"),
    ("red", "red"), ("blue", "blue"), ("green", "green"), ("yellow", "yellow"), ("white", "white"), ("black", "black"),
]  # fmt: skip

TOOL_NAMES_JA = {
    "resize": "リサイズ", "crop": "切り抜き", "rotate": "回転", "flip": "反転", "encode": "出力形式",
    "grayscale": "グレースケール化", "blur": "ぼかし", "sharpen": "シャープ化", "adjust": "色調整",
    "threshold": "二値化", "edge_detect": "エッジ検出", "draw_boxes": "枠の描画", "blur_regions": "領域のぼかし",
    "detect": "物体検出",
}  # fmt: skip

VARIANT_WORDS = re.compile(r"それぞれ|別々|別に|個別|二通り|2通り|2種類|両方")
EACH_BRANCH = re.compile(r"どちらも|両方とも|どれも|すべて|全部")
QUALIFIER = re.compile(r"縦横比|アスペクト比|比率|残して|残す|残し|だけはっきり|見せて|元の画像|同じ(?:写真|画像)")
KEEP_AS_IS = re.compile(r"そのまま|変えない|変えず|維持|保って")
PARALLEL = re.compile(r"それぞれ|並列|同時に|別々|個別に|両方|二通り|2通り|2種類")
EDIT_CHANGE = re.compile(r"変え|変更|替え|直し|にして$|を(?:\d|[一-龥ぁ-ん])+に")
EDIT_REMOVE = re.compile(r"削除|消して|消す|取り除|外して|やめ|なくして|取って|いらない|要らない|不要")
EDIT_APPEND_FIRST = re.compile(r"最初に|先に|はじめに|初めに|まず")


@dataclass
class Op:
    """One planned operation."""

    tool: str
    params: dict[str, Any] = field(default_factory=dict)
    position: int = 0
    warnings: list[str] = field(default_factory=list)
    parallel: bool = False
    after: Op | None = None
    """For an op applied to each branch of a parallel group (「どちらもPNGで」): the branch it follows."""


@dataclass
class Clause:
    """A stretch of the instruction that usually carries one operation: its text, the normalised forms of its content
    words, whether its predicate is negated (〜ないで, 〜ずに, 不要, いらない, 〜じゃなくて) and whether it has a
    predicate at all (a verb or a する-noun: something was asked)."""

    text: str
    norm: str
    negated: bool = False
    predicate: bool = False
    verb: bool = False


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    return Dictionary(dict="core").tokenizer(mode=SplitMode.C)


NEGATIVE_WORDS = frozenset({"不要", "無用", "結構"})
LEADING_SKIP = frozenset({"から", "その", "後", "あと", "、", ",", "。", "に", "で"})


def split_clauses(instruction: str) -> list[Clause]:
    """Cut at punctuation, at conjunctive particles (〜て, 〜で), at 〜た後 and after a negation (〜ず); mark each
    clause negated or not and whether it has a predicate."""
    clauses: list[Clause] = []
    surface: list[str] = []
    norm: list[str] = []
    flags = {"negated": False, "predicate": False, "verb": False}

    def cut() -> None:
        text = "".join(surface).strip()
        if text:
            clauses.append(Clause(text, "".join(norm), flags["negated"], flags["predicate"], flags["verb"]))
        surface.clear()
        norm.clear()
        flags.update(negated=False, predicate=False, verb=False)

    tokens = list(_tokenizer().tokenize(instruction))
    for index, token in enumerate(tokens):
        pos = token.part_of_speech()
        word = token.surface()
        if not surface and word in LEADING_SKIP:
            continue
        if pos[1] in ("読点", "句点") or word in (",", ".", ";", "；"):
            cut()
            continue
        surface.append(word)
        norm.append(token.normalized_form() if pos[0] in ("名詞", "動詞", "形容詞") else word)
        before = tokens[index - 1] if index > 0 else None
        if (
            (pos[0] == "助動詞" and token.dictionary_form() in ("ない", "ず", "ぬ"))
            or (
                pos[0] == "形容詞"
                and token.dictionary_form() == "ない"
                and before is not None
                and before.surface() in ("じゃ", "では", "は")
            )
            or (pos[0] == "動詞" and token.dictionary_form() in ("やめる", "止める", "省く"))
            or word in NEGATIVE_WORDS
            or (word == "なし" and before is not None and before.part_of_speech()[0] == "名詞")
        ):
            flags["negated"] = True
        if pos[0] == "動詞" or (pos[0] == "名詞" and pos[2] == "サ変可能") or word in ("お願い", "ほしい", "欲しい"):
            flags["predicate"] = True
        if pos[0] == "動詞":
            flags["verb"] = True
        after = tokens[index + 1].surface() if index + 1 < len(tokens) else ""
        if (
            (
                pos[1] == "接続助詞"
                and word in ("て", "で")
                and after not in ("いる", "いく", "くる", "おく", "ほしい", "欲しい", "ください", "下さい")
            )
            or (word in ("後", "あと") and index > 0 and tokens[index - 1].surface() == "た")
            or (pos[1] == "接続助詞" and word == "から")
            or (pos[0] == "助動詞" and token.dictionary_form() == "ず" and after in ("に", ""))
            or (word == "前" and after == "に")
        ):
            cut()
    cut()
    return clauses


def _number(text: str) -> float | None:
    found = re.search(NUMBER, text)
    return float(found.group(1)) if found else None


def _int_or_float(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _classes(text: str) -> list[str]:
    found: list[tuple[int, str]] = []
    taken = [False] * len(text)
    for word, label in CLASS_WORDS:
        start = 0
        while (index := text.find(word, start)) >= 0:
            start = index + len(word)
            if any(taken[index : index + len(word)]):
                continue
            if word == "人" and text[index - 1 : index] in ("一", "二", "個", "何", "知", "本", "友"):
                continue
            if word == "本" and text[index + 1 : index + 2] not in ("を", "と", "や", "、"):
                continue
            for k in range(index, index + len(word)):
                taken[k] = True
            after = index + len(word)
            if text[after : after + 1] == "の" and any(text.startswith(w, after + 1) for w, _ in CLASS_WORDS):
                continue  # 人物の顔 = the faces, not the people
            found.append((index, label))
    ordered: list[str] = []
    for _, label in sorted(found):
        if label not in ordered:
            ordered.append(label)
    return ordered


def _fraction(text: str) -> float | None:
    if "半分" in text or "二分の一" in text or "2分の1" in text:
        return 0.5
    match = re.search(r"(\d+)\s*分の\s*(\d+)", text)
    if match:
        return int(match.group(2)) / int(match.group(1))
    match = re.search(r"(\d+)\s*/\s*(\d+)", text)
    if match and int(match.group(2)):
        return int(match.group(1)) / int(match.group(2))
    match = re.search(NUMBER + r"\s*(?:%|パーセント)", text)
    if match:
        return float(match.group(1)) / 100
    match = re.search(NUMBER + r"\s*倍", text)
    if match:
        return float(match.group(1))
    return None


def _size_pair(text: str) -> tuple[int, int] | None:
    match = re.search(r"(\d+)\s*(?:px)?\s*[x×*]\s*(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _labelled(text: str, words: str) -> float | None:
    match = re.search(rf"(?:{words})\s*(?:を|が|は|:|=)?\s*{NUMBER}", text)
    return float(match.group(1)) if match else None


def _resize_params(text: str, op: Op) -> None:
    pair = _size_pair(text)
    if pair:
        op.params.update(width=pair[0], height=pair[1])
        if "そのまま" not in text and re.search(
            r"(?:縦横比|比率|アスペクト比?)(?:は|を)?(?:無視|気にせず|崩して)|ぴったり", text
        ):
            op.params["keep_aspect"] = False
        return
    longest = _labelled(text, "長辺|長い辺|最大辺")
    if longest is not None:
        op.params["max_side"] = int(longest)
        return
    width, height = _labelled(text, "幅|横幅|横"), _labelled(text, "高さ|縦")
    if width is not None or height is not None:
        if width is not None:
            op.params["width"] = int(width)
        if height is not None:
            op.params["height"] = int(height)
        return
    factor = _fraction(text)
    if factor is not None and factor > 0:
        op.params["scale"] = _int_or_float(round(factor, 4))
        return
    pixels = re.search(NUMBER + r"\s*(?:px|ピクセル)", text)
    if pixels:
        op.params["max_side"] = int(float(pixels.group(1)))
        op.warnings.append("サイズの指定を長辺の長さとして解釈しました")
        return
    if "拡大" in text or "大きく" in text:
        op.params["scale"] = 2
        op.warnings.append("倍率の指定がないため 2 倍に拡大します")
    else:
        op.params["scale"] = 0.5
        op.warnings.append("倍率の指定がないため半分に縮小します")


def _crop_params(text: str, op: Op) -> None:
    pair = _size_pair(text)
    if pair:
        op.params.update(width=pair[0], height=pair[1])
    else:
        width, height = _labelled(text, "幅|横"), _labelled(text, "高さ|縦")
        side = _number(text)
        op.params["width"] = int(width or side or 256)
        op.params["height"] = int(height or width or side or 256)
        if side is None and width is None:
            op.warnings.append("切り抜く大きさの指定がないため 256x256 にしました")
    if re.search(r"中央|中心|真ん中|センター", text):
        op.params["anchor"] = "center"
        return
    point = re.search(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)|x\s*=?\s*(\d+)\s*[,、]?\s*y\s*=?\s*(\d+)", text)
    if point:
        numbers = [g for g in point.groups() if g is not None]
        op.params.update(x=int(numbers[0]), y=int(numbers[1]))


def _rotate_params(text: str, op: Op) -> None:
    match = re.search(NUMBER + r"\s*(?:度|°|deg)", text)
    angle = float(match.group(1)) if match else None
    if angle is None:
        angle = 180.0 if ("半回転" in text or "逆さ" in text) else 90.0
        if "半回転" not in text and "逆さ" not in text:
            op.warnings.append("角度の指定がないため 90 度にしました")
    clockwise = bool(re.search(r"右|時計回り|時計方向", text)) and not re.search(r"反時計|左", text)
    op.params["angle"] = _int_or_float(-angle if clockwise else angle)


def _blur_params(text: str, op: Op) -> None:
    if re.search(r"メディアン|median|ノイズ", text):
        op.params["method"] = "median"
    elif re.search(r"ボックス|box|平均", text):
        op.params["method"] = "box"
    elif re.search(r"ガウシアン|ガウス|gaussian", text):
        op.params["method"] = "gaussian"
    radius = _labelled(text, "半径|radius|強さ|サイズ")
    if radius is not None:
        op.params["radius"] = _int_or_float(radius)
    elif re.search(r"強く|強め|しっかり|かなり", text):
        op.params["radius"] = 6
    elif re.search(r"弱く|弱め|軽く|少し", text):
        op.params["radius"] = 1


def _adjust_params(text: str, op: Op) -> None:
    for words, key, up, down in (
        ("明るさ|明度|輝度|明るく|暗く", "brightness", r"明るく|上げ|高く|強く", r"暗く|下げ|低く|弱く"),
        ("コントラスト", "contrast", r"上げ|強く|高く|強め", r"下げ|弱く|低く|弱め"),
        ("彩度|鮮やか|色の濃さ", "saturation", r"上げ|強く|高く|鮮やか", r"下げ|弱く|低く|くすま"),
    ):
        found = re.search(words, text)
        if not found:
            continue
        tail = text[found.start() :]
        factor = re.search(NUMBER + r"\s*倍", tail)
        percent = re.search(NUMBER + r"\s*(?:%|パーセント)", tail)
        tenths = re.search(NUMBER + r"\s*割", tail)
        down = down + r"|減|落と|抑え|控えめ|少なく"
        if factor:
            op.params[key] = _int_or_float(float(factor.group(1)))
        elif percent or tenths:
            delta = float(percent.group(1)) / 100 if percent else float(tenths.group(1)) / 10  # type: ignore[union-attr]
            op.params[key] = round(1 - delta if re.search(down, tail) else 1 + delta, 4)
        elif "半分" in tail:
            op.params[key] = 0.5
        elif re.search(down, tail):
            op.params[key] = 0.8 if key != "saturation" else 0.7
        else:
            op.params[key] = 1.2 if key == "brightness" else 1.3
            if not re.search(up, tail):
                op.warnings.append(f"{key} の倍率を既定値で補いました")


def _threshold_params(text: str, op: Op) -> None:
    if re.search(r"大津|otsu|自動", text):
        op.params["method"] = "otsu"
        return
    value = _labelled(text, "しきい値|閾値|値|threshold")
    if value is None:
        value = _number(re.sub(r"[2二]値", "", text))
    if value is not None:
        op.params.update(method="fixed", value=int(value))


def _detect_params(text: str, op: Op) -> None:
    op.params["classes"] = _classes(text)
    score = _labelled(text, "信頼度|スコア|確信度|確率|score|しきい値|閾値")
    if score is not None:
        op.params["min_score"] = round(score / 100, 4) if score > 1 else score
    most = re.search(r"(?:最大|上位|最高)\s*(\d+)|(\d+)\s*(?:個|件|つ)まで", text)
    if most:
        op.params["max_detections"] = int(next(g for g in most.groups() if g))


def _edge_params(text: str, op: Op) -> None:
    low, high = _labelled(text, "下限|low"), _labelled(text, "上限|high")
    pair = re.search(r"(\d+)\s*(?:と|,|、|~|〜|-)\s*(\d+)", text)
    if low is None and high is None and pair:
        low, high = float(pair.group(1)), float(pair.group(2))
    if low is not None:
        op.params["low"] = int(low)
    if high is not None:
        op.params["high"] = int(high)


def _color(text: str) -> str | None:
    hex_color = re.search(r"#[0-9a-f]{6}\b|#[0-9a-f]{3}\b", text)
    if hex_color:
        return hex_color.group(0)
    return next((name for word, name in COLOR_WORDS if word in text), None)


def _draw_params(text: str, op: Op) -> None:
    color = _color(text)
    if color:
        op.params["color"] = color
    thickness = _labelled(text, "太さ|線幅|thickness")
    if thickness is not None:
        op.params["thickness"] = int(thickness)
    elif re.search(r"太い|太く|太め", text):
        op.params["thickness"] = 4
    if re.search(r"ラベルなし|ラベルを(?:表示しない|消|付けない)|ラベル無し", text):
        op.params["show_labels"] = False


EXCEPT_WORDS = re.compile(r"以外|ほか(?:は|を|の)|他(?:は|を|の)|周り|周囲|背景|残して|残し|だけはっきり")


def _region_params(text: str, op: Op) -> None:
    if EXCEPT_WORDS.search(text):
        op.params["area"] = "outside"
    block = _labelled(text, "ブロック|block|粗さ")
    if re.search(r"モザイク|ピクセル|pixel", text) or block is not None:
        op.params["method"] = "pixelate"
        if block is not None:
            op.params["block"] = int(block)
    else:
        radius = _labelled(text, "半径|radius|強さ")
        if radius is not None:
            op.params["radius"] = _int_or_float(radius)
        elif re.search(r"強く|強め|しっかり", text):
            op.params["radius"] = 24


def _encode_params(text: str, op: Op) -> None:
    fmt = re.search(r"png|jpe?g|webp", text)
    op.params["format"] = {"jpg": "jpeg"}.get(fmt.group(0), fmt.group(0)) if fmt else "png"
    quality = _labelled(text, "品質|画質|quality|クオリティ")
    if quality is not None and op.params["format"] in ("jpeg", "webp"):
        op.params["quality"] = int(quality)


DETECT_WORDS = re.compile(r"検出|検知|認識|見つけ|探し|探す|特定|detect")
DETECT_REFERENCE = re.compile(r"検出(?:結果|した(?:もの|物|部分|領域|箇所|対象|物体|範囲))|検出済")
BLUR_WORDS = re.compile(r"ぼか|ボカ|暈|ぼや|ブラー|blur|平滑|ノイズ(?:を)?(?:除去|取|消|減|落と)|隠|メディアン")
MOSAIC_WORDS = re.compile(r"モザイク|ピクセル化|ピクセレート|pixelate")
DRAW_WORDS = re.compile(r"枠|囲|描画|描い|描く|ボックス|矩形|バウンディング|四角|box")


SIZE_ONLY = re.compile(
    r"(?:幅|横幅|高さ|縦)\s*(?:を|が|は)?\s*\d|\d+\s*(?:px|ピクセル)|\d+\s*[x×*]\s*\d+|半分|\d+\s*分の\s*\d+"
)


def clause_ops(clause: Clause, previous: list[Op], *, fallback: bool = False, context: str = "") -> list[Op]:
    """The operations one clause asks for, in the order they appear; with `fallback`, a bare size means resize."""
    text = normalise(clause.text)
    both = text + " " + normalise(clause.norm)
    found: list[Op] = []

    def add(tool: str, where: int, filler: Any = None) -> Op:
        op = Op(tool, position=where)
        if filler is not None:
            filler(text, op)
        found.append(op)
        return op

    if match := re.search(r"png|jpe?g|webp", text):
        add("encode", match.start(), _encode_params)
    resize = re.search(r"リサイズ|縮小|拡大|サイズを|大きさ|小さく|ちっちゃく|ちいさく|大きく|縮め|resize|長辺", text)
    adjusting = re.search(r"明るさ|明度|輝度|コントラスト|彩度", text)
    if resize is None and not adjusting and re.search(r"にして|にする|にしたい|に変更|に$", text):
        resize = SIZE_ONLY.search(text)  # 「半分にして」「幅640pxにして」
    if resize and not re.search(r"切り抜|切り取|切り出|トリミング|クロップ", text):
        add("resize", resize.start(), _resize_params)
    relative_crop = re.search(r"半分|分の|割|%|パーセント|上側|下側|左側|右側|上部|下部", text) and not re.search(
        r"\d+\s*(?:px|ピクセル|[x×*]\s*\d)", text
    )
    if (match := re.search(r"切り抜|切り取|切り出|トリミング|クロップ|crop", text)) and not relative_crop:
        add("crop", match.start(), _crop_params)
    if match := re.search(r"回転|回し|rotate|半回転|逆さ|傾け|傾き", text):
        add("rotate", match.start(), _rotate_params)
    if match := re.search(r"反転|ミラー|鏡像|鏡写し|flip|裏返|ひっくり返", text):
        op = add("flip", match.start())
        op.params["direction"] = "vertical" if re.search(r"上下|垂直|縦|vertical", text) else "horizontal"
    threshold = re.search(r"二値|2値|しきい値|閾値|threshold|大津", text)
    if threshold and re.search(r"下限|上限|canny|キャニー", text) and not re.search(r"二値|2値", text):
        threshold = None  # edge detection's two thresholds, not a threshold step
    if threshold and not DETECT_WORDS.search(text):
        add("threshold", threshold.start(), _threshold_params)
    elif match := re.search(r"グレースケール|グレー|白黒|モノクロ|灰色|gray|grey", both):
        add("grayscale", min(match.start(), len(text)))
    enhance = re.search(r"(?:エッジ|輪郭)(?:を|が|だけ)?(?:強調|強く|くっきり|はっきり|シャープ)", text)
    edge = None if enhance else re.search(r"エッジ|輪郭|canny|edge", text)
    if edge:
        add("edge_detect", edge.start(), _edge_params)
    if match := (enhance or re.search(r"シャープ|鮮鋭|くっきり|鮮明|sharpen", text)):
        op = add("sharpen", match.start())
        amount = _labelled(text, "強さ|量|amount") or _fraction(text)
        if amount is not None:
            op.params["amount"] = _int_or_float(amount)
        elif re.search(r"強く|強め", text):
            op.params["amount"] = 2
    if match := re.search(r"明るさ|明度|輝度|明るく|暗く|コントラスト|彩度|鮮やか", text):
        add("adjust", match.start(), _adjust_params)

    classes = _classes(text)
    background = BLUR_WORDS.search(text) and re.search(r"背景|周り|周囲|ほか|他", text)
    if background and not classes:  # 「背景をぼかして、人物はそのまま」: what stays sharp is named elsewhere
        classes = _classes(normalise(context)) or ["person"]
    detect_match = DETECT_WORDS.search(text)
    detect_here = detect_match if detect_match and not DETECT_REFERENCE.search(text) and not edge else None
    region_blur = MOSAIC_WORDS.search(text) or (
        BLUR_WORDS.search(text)
        and (classes or DETECT_REFERENCE.search(text) or (previous and previous[-1].tool == "detect") or detect_here)
        and not re.search(r"全体|画像を(?:ぼか|ガウ)", text)
    )
    draw_match = DRAW_WORDS.search(text)
    boxes_named = re.search(r"枠|囲|ボックス|矩形|バウンディング|四角|box", text)
    detected = detect_here or DETECT_REFERENCE.search(text) or "結果" in text
    draw_context = detected or (boxes_named and (classes or _has_detect(previous, found)))
    draw = draw_match if draw_match and draw_context else None
    if detect_here:
        add("detect", detect_here.start(), _detect_params)
    if region_blur:
        where = (MOSAIC_WORDS.search(text) or BLUR_WORDS.search(text)).start()  # type: ignore[union-attr]
        if not _has_detect(previous, found) or not _detect_covers(previous, found, classes):
            implied = add("detect", max(0, where - 1))
            implied.params["classes"] = classes or ["face"]
            if not classes:
                implied.warnings.append("対象の指定がないため顔を検出してぼかします")
            elif background and not _classes(text) and not _classes(normalise(context)):
                implied.warnings.append("残す対象の指定がないため、人物を残して背景をぼかします")
        region = add("blur_regions", where, _region_params)
        if background:
            region.params["area"] = "outside"
    elif (blur := BLUR_WORDS.search(text)) and not detect_here:
        add("blur", blur.start(), _blur_params)
    if (draw or region_blur) and not detect_here and _has_detect(previous, []):
        score = _labelled(text, "信頼度|スコア|確信度|確率|score")
        latest = next(op for op in reversed(previous) if op.tool == "detect")
        if score is not None and "min_score" not in latest.params:
            latest.params["min_score"] = round(score / 100, 4) if score > 1 else score
    if draw:
        where = draw.start()
        if not _has_detect(previous, found) or not _detect_covers(previous, found, classes):
            implied = add("detect", max(0, where - 1))
            implied.params["classes"] = classes
        add("draw_boxes", where, _draw_params)
    crop_words = re.search(r"切り抜|切り取|切り出|トリミング|クロップ|crop", text)
    if not found and fallback and not crop_words and (size := SIZE_ONLY.search(text)):
        add("resize", size.start(), _resize_params)
    found.sort(key=lambda op: op.position)
    return found


GENERIC_TARGETS = re.compile(
    r"^(?:画像|写真|全体|背景|周り|周囲|ほか|他|部分|ところ|箇所|範囲|領域|検出|結果|それ|これ|ここ|真ん中|中央|上|下|左|右)"
)


def _unknown_target(clause: Clause, found: list[Op]) -> str | None:
    """The object a region operation names when no detector knows it (「ナンバープレートにモザイク」), else None."""
    if not any(op.tool in ("blur_regions", "draw_boxes") for op in found) or _classes(normalise(clause.text)):
        return None
    match = re.match(
        r"^(?:この|その|あの)?([^\s、。をにのはもがで]{2,20}?)(?:の(?:部分|ところ|箇所|あたり))?(?:に|を|だけ)",
        clause.text,
    )
    if match is None or GENERIC_TARGETS.search(match.group(1)) or DETECT_REFERENCE.search(match.group(1)):
        return None
    noun = match.group(1)
    if re.search(r"モザイク|ぼか|ボカ|枠|ブラー|\d", noun):
        return None
    return noun


def _variants(clause: Clause, previous: list[Op]) -> list[Op] | None:
    """「PNGとJPEGで別々に」「幅400pxと幅800pxにそれぞれ」: the clause split at と into parts, each part one variant of
    the operation (a part without its own verb borrows the tool of the last part). None unless some tool comes out
    more than once, so 「グレースケールとエッジ検出をそれぞれ」 keeps its ordinary parse."""
    parts = [part for part in re.split(r"と(?!して|する|し$)", clause.text) if part]
    if len(parts) < 2:
        return None
    last_ops = clause_ops(Clause(parts[-1], parts[-1]), previous)
    if not last_ops:
        return None
    found: list[Op] = []
    for offset, part in enumerate(parts):
        part_ops = clause_ops(Clause(part, part), [*previous, *found]) if offset < len(parts) - 1 else last_ops
        if not part_ops:
            borrowed = []
            for template in last_ops:
                op = Op(template.tool, position=template.position)
                filler = FILLERS.get(template.tool)
                if filler is not None:
                    filler(normalise(part), op)
                if op.params and not op.warnings:
                    borrowed.append(op)
            part_ops = borrowed
        for op in part_ops:
            op.position = offset * 1000 + op.position
        found.extend(part_ops)
    tools = [op.tool for op in found if op.tool != "detect"]
    if len(tools) == len(set(tools)):
        return None
    return found


BUILT_IN = frozenset(TOOL_NAMES_JA)


def _registered_ops(clause: Clause, tools: dict[str, RegisteredTool], *, built_in: bool = False) -> list[Op]:
    """Ops for registered tools whose manifest phrases occur in the clause: the lexicon follows the registry. Tools
    beyond the reference catalog (a third-party service, an imported Triton model) always; the reference tools, whose
    grammar above knows more, only as the fallback for a clause it found nothing in (`built_in`), their params read by
    the same fillers."""
    text = normalise(clause.text)
    found = []
    for name in sorted(tools):
        if (name in BUILT_IN) != built_in or (built_in and tools[name].input_type("detections") is not None):
            continue  # a step that needs detections comes from the grammar, which also plans their detect
        for phrase in tools[name].manifest.phrases_ja:
            where = text.find(normalise(phrase))
            if phrase.strip() and where >= 0:
                op = Op(name, position=where)
                filler = FILLERS.get(name) if built_in else None
                if filler is not None:
                    filler(text, op)
                found.append(op)
                break
    return found


def _detect_covers(previous: list[Op], current: list[Op], classes: list[str]) -> bool:
    """Whether the latest detect finds every class named here (an empty class list finds everything)."""
    latest = next((op for op in reversed([*previous, *current]) if op.tool == "detect"), None)
    if latest is None:
        return False
    have = latest.params.get("classes") or []
    return not have or set(classes) <= set(have)


def _has_detect(previous: list[Op], current: list[Op]) -> bool:
    return any(op.tool == "detect" for op in [*previous, *current])


class OfflinePlanner:
    """Deterministic: the same instruction and registry give the same pipeline."""

    name = "offline"

    async def plan(
        self,
        instruction: str,
        base: pipeline_pb2.Pipeline | None,
        tools: dict[str, RegisteredTool],
        registry_version: int,
    ) -> Draft:
        """Plan a new pipeline, or edit `base`."""
        ops, not_done = self.parse_all(instruction, tools)
        if base is not None and base.steps:
            return self._edit(instruction, base, ops)
        if not ops and not_done:
            raise invalid_argument(
                "INSTRUCTION_NOT_DOABLE",
                "画像処理の指示として実行できる部分がありませんでした（"
                + "、".join(f"「{t}」" for t in not_done)
                + f"に対応するツールがありません）。{CAPABILITIES}",
            )
        if not ops:
            raise out_of_scope()
        return self._build(ops)

    def parse(self, instruction: str) -> list[Op]:
        """Operations in order (see parse_all)."""
        return self.parse_all(instruction)[0]

    def parse_all(self, instruction: str, tools: dict[str, RegisteredTool] | None = None) -> tuple[list[Op], list[str]]:
        """Operations in order, and the clauses no tool does; ops in clauses joined by parallel words are marked
        parallel. Negated clauses plan nothing (a negated label turns labels off); a clause that asks for something no
        tool does becomes a warning on the first op (`Op.warnings`), never a silent drop."""
        clauses = split_clauses(instruction)
        ops: list[Op] = []
        unplanned: list[str] = []
        unplanned_targets: list[tuple[str, str]] = []
        no_labels = False
        parallel_from: int | None = None
        carried: Clause | None = None
        before_next: list[Op] | None = None
        for index, current in enumerate(clauses):
            clause = (
                Clause(
                    carried.text + current.text,
                    carried.norm + current.norm,
                    current.negated,
                    carried.predicate or current.predicate,
                    carried.verb or current.verb,
                )
                if carried
                else current
            )
            if clause.negated:
                no_labels = no_labels or "ラベル" in clause.text
                carried = None
                continue
            clause_found = sorted(
                clause_ops(clause, ops, context=instruction) + _registered_ops(clause, tools or {}),
                key=lambda op: op.position,
            )
            if not clause_found:
                clause_found = _registered_ops(clause, tools or {}, built_in=True)
            variants = _variants(clause, ops) if VARIANT_WORDS.search(clause.text) else None
            if variants is not None:
                clause_found = variants
            if clause_found and EACH_BRANCH.search(clause.text) and not variants:
                group_start = -1 if parallel_from is None else parallel_from * 10_000
                branches = [o for o in ops if group_start >= 0 and o.position >= group_start and o.tool != "detect"]
                if len(branches) > 1:  # 「どちらもPNGで保存」: the same step after each branch
                    clause_found = [
                        Op(op.tool, dict(op.params), op.position, list(op.warnings), after=branch)
                        for branch in branches
                        for op in clause_found
                    ]
            unknown = _unknown_target(clause, clause_found)
            if unknown is not None:
                unplanned_targets.append((unknown, clause.text))
                carried = None
                continue
            if not clause_found and not clause.verb and ops and _supplement(ops[-1], clause.text):
                carried = None  # 「（半径20）」「ブロックは24で」: more params for the step just planned
                continue
            last = index + 1 == len(clauses)
            if not clause_found and not last and (not clause.predicate or QUALIFIER.search(clause.text)):
                carried = clause  # a clause with no verb of its own (or a qualifier) shapes the next one
                continue
            carried = None
            if not clause_found:
                clause_found = clause_ops(clause, ops, fallback=True)
            if not clause_found:
                if clause.predicate and not KEEP_AS_IS.search(clause.text):
                    unplanned.append(clause.text)
                continue
            if PARALLEL.search(clause.text) and not any(op.after for op in clause_found):
                start = index
                while start > 0 and re.search(r"と$|と、?$|や$", clauses[start - 1].text):
                    start -= 1
                parallel_from = start
            for op in clause_found:
                op.position += index * 10_000
            if before_next is not None:  # 「Xする前に、Y」: Y first, X right after Y (before the next clause)
                last_y = max(op.position for op in clause_found)
                for offset, op in enumerate(before_next):
                    op.position = last_y + 1 + offset
                before_next = None
            if re.search(r"前に?$", clause.text):
                before_next = clause_found
            ops.extend(clause_found)
        ops.sort(key=lambda op: op.position)
        if parallel_from is not None:
            boundary = parallel_from * 10_000
            group = [op for op in ops if op.position >= boundary]
            if len(group) > 1:
                for op in group:
                    op.parallel = True
        if no_labels:
            for op in ops:
                if op.tool == "draw_boxes":
                    op.params["show_labels"] = False
        merged = _merge_repeats(ops)
        if merged and unplanned:
            merged[0].warnings.extend(
                f"「{text}」に対応するツールがないため、この部分は行いません" for text in unplanned
            )
        if merged and unplanned_targets:
            merged[0].warnings.extend(
                f"「{target}」は検出できる対象にないため、「{text}」は行いません" for target, text in unplanned_targets
            )
        return merged, [*unplanned, *(text for _, text in unplanned_targets)]

    def _build(self, ops: list[Op]) -> Draft:
        pipeline = pipeline_pb2.Pipeline(name="generated")
        explanations: dict[str, str] = {}
        warnings: list[str] = []
        previous: str | None = None
        branch_root: str | None = None
        in_parallel = False
        used: dict[str, int] = {}
        step_of: dict[int, str] = {}
        for op in ops:
            used[op.tool] = used.get(op.tool, 0) + 1
            step_id = op.tool if used[op.tool] == 1 else f"{op.tool}_{used[op.tool]}"
            step = pipeline.steps.add(id=step_id, tool=op.tool, params=dict_to_struct(op.params))
            if op.after is not None and id(op.after) in step_of:
                step.depends_on.append(step_of[id(op.after)])
            elif op.parallel and op.tool != "detect":
                if not in_parallel:
                    branch_root, in_parallel = previous, True
                if branch_root:
                    step.depends_on.append(branch_root)
            else:
                if previous:
                    step.depends_on.append(previous)
                if in_parallel:  # a detect inside a parallel group feeds every branch after it
                    branch_root = step_id
            step_of[id(op)] = step_id
            previous = step_id
            explanations[step_id] = explain(op.tool, op.params)
            warnings.extend(op.warnings)
        return Draft(pipeline, explanations, warnings)

    def _edit(self, instruction: str, base: pipeline_pb2.Pipeline, ops: list[Op]) -> Draft:
        pipeline = pipeline_pb2.Pipeline()
        pipeline.CopyFrom(base)
        text = normalise(instruction)
        explanations = {step.id: explain(step.tool, struct_to_dict(step.params)) for step in pipeline.steps}
        targets = {op.tool for op in ops} | _attribute_tools(text)
        if EDIT_REMOVE.search(text):
            named = {op.tool for clause in split_clauses(instruction) for op in clause_ops(clause, [])}
            targets |= {tool for tool in named if tool != "detect" or DETECT_WORDS.search(text)}
            doomed = {step.id for step in pipeline.steps if step.tool in targets}
            if not doomed:
                raise out_of_scope()
            _remove_steps(pipeline, doomed)
            return Draft(pipeline, {k: v for k, v in explanations.items() if k not in doomed}, [])
        changed = False
        if EDIT_CHANGE.search(text) or _attribute_tools(text):
            for step in pipeline.steps:
                update = next((op for op in ops if op.tool == step.tool), None)
                if update is None and step.tool in _attribute_tools(text):
                    update = Op(step.tool)
                    {"draw_boxes": _draw_params, "detect": _detect_params, "blur_regions": _region_params,
                     "encode": _encode_params, "blur": _blur_params}.get(step.tool, lambda t, o: None)(text, update)  # fmt: skip
                if update is None or not update.params:
                    continue
                params = struct_to_dict(step.params)
                params.update(update.params)
                step.params.CopyFrom(dict_to_struct(params))
                explanations[step.id] = explain(step.tool, params)
                changed = True
        if changed:
            return Draft(pipeline, explanations, [])
        if not ops:
            raise out_of_scope()
        first = bool(EDIT_APPEND_FIRST.search(text)) and "最後" not in text
        added = self._build(ops).pipeline
        taken = {step.id for step in pipeline.steps}
        rename = {}
        for step in added.steps:
            new_id, n = step.id, 2
            while new_id in taken:
                new_id, n = f"{step.tool}_{n}", n + 1
            rename[step.id] = new_id
            taken.add(new_id)
        sinks = [s.id for s in pipeline.steps if not any(s.id in o.depends_on for o in pipeline.steps)]
        new_steps = []
        for step in added.steps:
            copy = pipeline_pb2.Step()
            copy.CopyFrom(step)
            copy.id = rename[step.id]
            deps = [rename[d] for d in step.depends_on]
            del copy.depends_on[:]
            copy.depends_on.extend(deps or ([] if first else sinks[-1:]))
            new_steps.append(copy)
            explanations[copy.id] = explain(copy.tool, struct_to_dict(copy.params))
        if first:
            heads = [s for s in pipeline.steps if not s.depends_on]
            for head in heads:
                head.depends_on.append(new_steps[-1].id)
            steps = [*new_steps, *pipeline.steps]
            del pipeline.steps[:]
            pipeline.steps.extend(steps)
        else:
            pipeline.steps.extend(new_steps)
        return Draft(pipeline, explanations, [])


def _attribute_tools(text: str) -> set[str]:
    """Tools whose parameters an edit names without naming the tool (枠の色, 品質 …)."""
    tools = set()
    if re.search(r"枠|線の?(?:色|太さ)", text):
        tools.add("draw_boxes")
    if re.search(r"品質|画質", text):
        tools.add("encode")
    if re.search(r"信頼度|スコア", text):
        tools.add("detect")
    if re.search(r"モザイク", text):
        tools.add("blur_regions")
    return tools


def _remove_steps(pipeline: pipeline_pb2.Pipeline, doomed: set[str]) -> None:
    parents = {step.id: list(step.depends_on) for step in pipeline.steps}

    def live_parents(step_id: str) -> list[str]:
        result: list[str] = []
        for parent in parents[step_id]:
            result.extend(live_parents(parent) if parent in doomed else [parent])
        return result

    kept = []
    for step in pipeline.steps:
        if step.id in doomed:
            continue
        new_deps = live_parents(step.id)
        del step.depends_on[:]
        step.depends_on.extend(dict.fromkeys(new_deps))
        for port, ref in list(step.inputs.items()):
            if ref.split(".")[0] in doomed:
                del step.inputs[port]
        kept.append(step)
    del pipeline.steps[:]
    pipeline.steps.extend(kept)


def _merge_repeats(ops: list[Op]) -> list[Op]:
    """One step for what one operation was said about twice in a row (「しきい値を190にして2値化」, 「明るさを上げて
    彩度も」): consecutive ops of the same tool whose params do not clash, outside parallel groups."""
    merged: list[Op] = []
    for op in ops:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and op.tool == previous.tool
            and op.tool in ("adjust", "threshold", "encode", "blur", "sharpen", "edge_detect")
            and not op.parallel
            and not previous.parallel
            and all(previous.params.get(k, v) == v for k, v in op.params.items())
        ):
            previous.params.update(op.params)
            previous.warnings.extend(op.warnings)
            continue
        merged.append(op)
    return merged


FILLERS: dict[str, Any] = {}


def _supplement(op: Op, text: str) -> bool:
    """Read params for `op` from a clause that only adds them; True when it found some."""
    filler = FILLERS.get(op.tool)
    if filler is None or not re.search(r"\d|ラベル|色|太", text):
        return False
    extra = Op(op.tool)
    filler(normalise(text), extra)
    found = {
        k: v for k, v in extra.params.items() if v not in ([], "", None) and (k not in op.params or op.params[k] != v)
    }
    if op.tool == "encode" and not re.search(r"png|jpe?g|webp", normalise(text)):
        found.pop("format", None)
    if not found or extra.warnings:
        return False
    op.params.update(found)
    return True


FILLERS.update(
    resize=_resize_params, crop=_crop_params, rotate=_rotate_params, blur=_blur_params, adjust=_adjust_params,
    threshold=_threshold_params, detect=_detect_params, draw_boxes=_draw_params, blur_regions=_region_params,
    encode=_encode_params, edge_detect=_edge_params,
)  # fmt: skip


def explain(tool: str, params: dict[str, Any]) -> str:
    """A short Japanese explanation of one step."""
    name = TOOL_NAMES_JA.get(tool, tool)
    if not params:
        return name
    shown = "、".join(f"{k}={v}" for k, v in params.items())
    return f"{name}（{shown}）"
