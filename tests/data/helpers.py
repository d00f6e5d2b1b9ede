"""Small raw archives in each official layout, written by the tests themselves."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

# the real MovieLens-100K, never copied into the project: ../shared/data beside the checkout
ML100K_RAW = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"
if not ML100K_RAW.exists():
    ML100K_RAW = Path("/work/shared/data/ml-100k")
needs_ml100k = pytest.mark.skipif(
    not (ML100K_RAW / "u.data").exists(), reason=f"real MovieLens-100K not found at {ML100K_RAW}"
)

ML1M_RATINGS = [
    # user::item::rating::time; user 1 rates items 10 and 11 in the same second (tie).
    "1::10::5::100",
    "2::20::3::50",
    "1::11::4::100",
    "1::12::1::90",
    "2::21::2::40",
    "2::22::5::60",
]
ML1M_USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]

KUAIRAND_LOG_HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)
KUAIRAND_USER_HEADER = (
    "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,"
    "follow_user_num,follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,"
    "friend_user_num_range,register_days,register_days_range"
)


def kuairand_row(user: int, video: int, time_ms: int, flags: dict[str, int] | None = None) -> str:
    f = {
        "is_click": 0,
        "is_like": 0,
        "is_follow": 0,
        "is_comment": 0,
        "is_forward": 0,
        "is_hate": 0,
        "long_view": 0,
        "is_profile_enter": 0,
    }
    f.update(flags or {})
    return (
        f"{user},{video},20220408,1000,{time_ms},{f['is_click']},{f['is_like']},{f['is_follow']},"
        f"{f['is_comment']},{f['is_forward']},{f['is_hate']},{f['long_view']},1000,2000,0,0,"
        f"{f['is_profile_enter']},0,1"
    )


def write_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def write_tar_gz(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def lines(rows: list[str]) -> str:
    return "\n".join(rows) + "\n"


def preprocess_ml100k(tmp: Path, ratings: list[str], users: list[str]) -> dict:
    """An ML-100K release folder under ``tmp`` (``ratings`` as u.data rows, ``users`` as
    u.user rows) preprocessed into ``tmp``/out/ml-100k; its metadata."""
    from hstu.data.preprocess import preprocess

    folder = tmp / "ml-100k"
    folder.mkdir()
    (folder / "u.data").write_text(lines(ratings))
    (folder / "u.user").write_text(lines(users))
    return preprocess("ml-100k", folder, tmp / "out", verbose=False)


def preprocess_shop(tmp: Path, stars: list[float], region: bool = False) -> Path:
    """A small custom CSV 'shop' (6 users, 4 rows each over 12 string item ids 'sku-N',
    ratings taken from ``stars`` in turn; with ``region``, a contextual column per user)
    preprocessed under ``tmp``/data; the dataset's folder."""
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    rows = ["user,item,ts,stars" + (",region" if region else "")]
    for u in range(6):
        for k in range(4):
            row = f"u{u},sku-{(u + 3 * k) % 12},{100 * u + k},{stars[(u + k) % len(stars)]}"
            rows.append(row + (f",r{u % 2}" if region else ""))
    (tmp / "shop.csv").write_text(lines(rows))
    custom = CustomDataArgs(user_column="user", item_column="item", timestamp_column="ts",
                            action_column="stars", contextual_columns=["region"] if region else [])
    preprocess("custom", tmp / "shop.csv", tmp / "data", output_name="shop", verbose=False,
               custom=custom)
    return tmp / "data" / "shop"


def ml1m_zip(tmp: Path, ratings: list[str] = ML1M_RATINGS, users: list[str] = ML1M_USERS) -> Path:
    return write_zip(
        tmp / "ml-1m.zip",
        {
            "ml-1m/ratings.dat": lines(ratings),
            "ml-1m/users.dat": lines(users),
            "ml-1m/README": "x\n",
        },
    )
