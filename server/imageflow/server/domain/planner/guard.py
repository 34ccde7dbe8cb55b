"""Refuses instructions that are not image processing or try to reach outside the sandbox."""

from __future__ import annotations

import re
import unicodedata

from imageflow.common.errors import invalid_argument

CAPABILITIES = (
    "できること: リサイズ・切り抜き・回転・反転・形式変換、グレースケール・ぼかし・シャープ・明るさ調整・二値化・"
    "エッジ検出、人物や顔などの検出と枠の描画・ぼかし（モザイク）。"
)

_UNSAFE = [
    (re.compile(r"(?:^|[\s「『(（])(?:/|~/|\.\./)[\w.\-/]+|[a-z]:\\", re.I), "ファイルやパスの読み書き"),
    (re.compile(r"(?:https?|ftp|file)://|www\.", re.I), "URL へのアクセス"),
    (
        re.compile(
            r"rm\s+-|sudo|chmod|curl\s|wget|bash|powershell|\bsh\s+-c|eval\(|exec\(|os\.system|subprocess", re.I
        ),
        "コマンドの実行",
    ),
    (re.compile(r"シェル|shell|コマンド(?:を)?実行|ターミナル|スクリプトを実行", re.I), "コマンドの実行"),
    (
        re.compile(
            r"(?:これまで|以前|前|上記|今まで|先ほど|システム)の(?:指示|命令|プロンプト|ルール)を(?:無視|忘れ)|"
            r"ignore (?:all |the )?(?:previous|prior|above) |system prompt|jailbreak|developer mode|"
            r"プロンプトを(?:表示|教え|出力)|あなたは今から",
            re.I,
        ),
        "指示の上書き",
    ),
    (
        re.compile(r"パスワード|password|api[ _-]?key|秘密鍵|環境変数|データベースを(?:削除|消)", re.I),
        "機密情報へのアクセス",
    ),
]


def normalise(text: str) -> str:
    """NFKC (全角 digits and letters to half width) and lowercase."""
    return unicodedata.normalize("NFKC", text).lower()


def check_instruction(instruction: str) -> None:
    """Raise INVALID_ARGUMENT with a Japanese message for unsafe requests."""
    text = normalise(instruction)
    for pattern, what in _UNSAFE:
        if pattern.search(text):
            raise invalid_argument(
                "INSTRUCTION_REFUSED",
                f"{what}はできません。ImageFlow は登録済みの画像処理ツールだけを使います。{CAPABILITIES}",
            )


def out_of_scope() -> Exception:
    """The error for instructions with no image operation in them."""
    return invalid_argument("INSTRUCTION_OUT_OF_SCOPE", f"画像処理の指示として理解できませんでした。{CAPABILITIES}")
