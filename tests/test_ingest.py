import pytest
from chispa import assert_df_equality

from mfdist import ingest as I
from mfdist.config import ColumnsConfig, InputConfig
from mfdist.errors import InputError

REJECTED = "user_id string, item_id string, rating string, ts string, reason string"


def _csv(tmp_path, lines, name="ratings.csv"):
    path = tmp_path / name
    path.write_text("u,i,r,t\n" + "\n".join(lines) + "\n")
    return str(path)


def _cfg(path, **kw):
    cols = ColumnsConfig(user="u", item="i", rating="r", timestamp="t")
    return InputConfig(path=path, format="csv", columns=cols, **kw)


def test_every_rejection_reason_lands_with_raw_values(spark, tmp_path):
    path = _csv(
        tmp_path,
        [
            "a,x,4.0,1600000000",
            ",x,3.0,1600000000",
            "b,,3.0,1600000000",
            "c,y,abc,1600000000",
            "d,y,NaN,1600000000",
            "e,y,9,1600000000",
            "f,y,3,yesterday",
            "g,z,2.5,2020-01-02T03:04:05",
            "h,z,1,",
        ],
    )
    res = I.ingest(spark, _cfg(path))
    assert (res.input_rows, res.accepted_rows, res.rejected_rows) == (9, 3, 6)
    expected = spark.createDataFrame(
        [
            (None, "x", "3.0", "1600000000", I.REASON_NULL_USER),
            ("b", None, "3.0", "1600000000", I.REASON_NULL_ITEM),
            ("c", "y", "abc", "1600000000", I.REASON_NAN),
            ("d", "y", "NaN", "1600000000", I.REASON_NAN),
            ("e", "y", "9", "1600000000", I.REASON_RANGE),
            ("f", "y", "3", "yesterday", I.REASON_TS),
        ],
        REJECTED,
    )
    assert_df_equality(res.rejected, expected, ignore_row_order=True, ignore_nullable=True)
    good = {(r.user_id, r.item_id, r.rating) for r in res.ratings.collect()}
    assert good == {("a", "x", 4.0), ("g", "z", 2.5), ("h", "z", 1.0)}
    assert I.count_by_reason(res.rejected, total=res.rejected_rows) == {
        I.REASON_NULL_USER: 1, I.REASON_NULL_ITEM: 1, I.REASON_NAN: 2, I.REASON_RANGE: 1, I.REASON_TS: 1}


def test_duplicates_last_keeps_newest_and_rejects_the_rest(spark, tmp_path):
    path = _csv(tmp_path, ["a,x,1,100", "a,x,5,300", "a,x,3,200", "b,x,2,100"])
    res = I.ingest(spark, _cfg(path))
    assert (res.input_rows, res.accepted_rows, res.rejected_rows) == (4, 2, 2)
    assert {(r.user_id, r.rating) for r in res.ratings.collect()} == {("a", 5.0), ("b", 2.0)}
    assert {r.reason for r in res.rejected.collect()} == {I.REASON_DUPLICATE}


def test_duplicates_last_breaks_ties_by_input_order_and_prefers_a_timestamp(spark, tmp_path):
    path = _csv(tmp_path, ["a,x,1,100", "a,x,2,100", "b,x,4,100", "b,x,5,", "c,y,3,", "c,y,1,", "d,y,x,100", "d,y,2,50"])
    res = I.ingest(spark, _cfg(path))
    assert (res.input_rows, res.accepted_rows, res.rejected_rows) == (8, 4, 4)
    assert {(r.user_id, r.rating) for r in res.ratings.collect()} == {("a", 2.0), ("b", 4.0), ("c", 1.0), ("d", 2.0)}
    superseded = {(r.user_id, r.rating, r.ts) for r in res.rejected.where(f"reason = '{I.REASON_DUPLICATE}'").collect()}
    assert superseded == {("a", "1", "100"), ("b", "5", None), ("c", "3", None)}
    assert res.rejected.where(f"reason = '{I.REASON_NAN}'").count() == 1


def test_duplicates_mean_and_error(spark, tmp_path):
    path = _csv(tmp_path, ["a,x,1,100", "a,x,4,300", "b,x,2,100"])
    mean = I.ingest(spark, _cfg(path, duplicates="mean"))
    assert {(r.user_id, r.rating) for r in mean.ratings.collect()} == {("a", 2.5), ("b", 2.0)}
    assert (mean.accepted_rows, mean.rejected_rows) == (3, 0)
    with pytest.raises(InputError, match="input.duplicates=error"):
        I.ingest(spark, _cfg(path, duplicates="error"))


def test_missing_column_names_the_key_and_column(spark, tmp_path):
    path = _csv(tmp_path, ["a,x,1,100"])
    cfg = InputConfig(path=path, format="csv", columns=ColumnsConfig(user="u", item="item", rating="r"))
    with pytest.raises(InputError, match=r"input.columns.item: column 'item'"):
        I.ingest(spark, cfg)


def test_all_rows_rejected_is_an_input_error(spark, tmp_path):
    path = _csv(tmp_path, ["a,x,abc,100"])
    with pytest.raises(InputError, match="no valid ratings"):
        I.ingest(spark, _cfg(path))


@pytest.mark.parametrize(
    "name, text, sep",
    [
        ("u.data", "1\t10\t4\t881250949\n2\t10\t3\t891717742\n", None),
        ("ratings.dat", "1::10::4::978300760\n2::10::3::978302109\n", None),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,10,3.0,964981247\n", None),
    ],
)
def test_movielens_layouts_are_detected(spark, tmp_path, name, text, sep):
    (tmp_path / name).write_text(text)
    res = I.ingest(spark, InputConfig(path=str(tmp_path), format="movielens"))
    rows = sorted((r.user_id, r.item_id, r.rating) for r in res.ratings.collect())
    assert rows == [("1", "10", 4.0), ("2", "10", 3.0)]
    assert res.ratings.where("ts is null").count() == 0


def test_parquet_keeps_long_ids(spark, tmp_path):
    df = spark.createDataFrame([(1 << 40, 7, 4.0), (3, 7, 2.0)], "uid long, iid long, score double")
    df.write.parquet(str(tmp_path / "p"))
    cfg = InputConfig(path=str(tmp_path / "p"), format="parquet", columns=ColumnsConfig(user="uid", item="iid", rating="score"))
    res = I.ingest(spark, cfg)
    assert dict(res.ratings.dtypes)["user_id"] == "bigint"
    assert res.accepted_rows == 2
