"""Column names, table names and the schemas of the published tables (the contract in DESIGN.md)."""

from pyspark.sql import types as T

# Canonical rating columns after ingest.
USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
TS = "ts"
REASON = "reason"
# Contiguous indices after reindex.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
# Model columns.
BIAS = "bias"
FACTORS = "factors"
# Published factor rows: whether the refine stage replaced the row.
REFINED = "refined"
RUN_ID = "run_id"
PREDICTION = "prediction"

RAW_COLUMNS = (USER_ID, ITEM_ID, RATING, TS)

RUNS = "runs"
USER_INDEX = "user_index"
ITEM_INDEX = "item_index"
USER_FACTORS = "user_factors"
ITEM_FACTORS = "item_factors"
RECOMMENDATIONS = "recommendations"
SIMILAR_ITEMS = "similar_items"
METRICS = "metrics"
EPOCHS = "epochs"
REJECTED_RATINGS = "rejected_ratings"

# Tables written per run into their run_id partition; the `runs` row commits them.
RUN_TABLES = (
    USER_INDEX,
    ITEM_INDEX,
    USER_FACTORS,
    ITEM_FACTORS,
    RECOMMENDATIONS,
    SIMILAR_ITEMS,
    METRICS,
    EPOCHS,
    REJECTED_RATINGS,
)
ALL_TABLES = (RUNS,) + RUN_TABLES

FACTOR_TYPE = T.ArrayType(T.FloatType(), containsNull=False)

MODEL_SCHEMA_USERS = T.StructType(
    [T.StructField(USER_IDX, T.IntegerType(), False), T.StructField(BIAS, T.FloatType()), T.StructField(FACTORS, FACTOR_TYPE)]
)
MODEL_SCHEMA_ITEMS = T.StructType(
    [T.StructField(ITEM_IDX, T.IntegerType(), False), T.StructField(BIAS, T.FloatType()), T.StructField(FACTORS, FACTOR_TYPE)]
)

RUNS_SCHEMA = T.StructType(
    [
        T.StructField("status", T.StringType()),
        T.StructField("started_at", T.TimestampType()),
        T.StructField("finished_at", T.TimestampType()),
        T.StructField("algorithm", T.StringType()),
        T.StructField("config", T.StringType()),
        T.StructField("input_rows", T.LongType()),
        T.StructField("accepted_rows", T.LongType()),
        T.StructField("rejected_rows", T.LongType()),
        T.StructField("error", T.StringType()),
    ]
)

METRICS_SCHEMA = T.StructType(
    [T.StructField("stage", T.StringType()), T.StructField("metric", T.StringType()), T.StructField("value", T.DoubleType())]
)

EPOCHS_SCHEMA = T.StructType(
    [
        T.StructField("stage", T.StringType()),
        T.StructField("epoch", T.IntegerType()),
        T.StructField("loss", T.DoubleType()),
        T.StructField("train_rmse", T.DoubleType()),
        T.StructField("test_rmse", T.DoubleType()),
        T.StructField("step_size", T.DoubleType()),
        T.StructField("seconds", T.DoubleType()),
    ]
)

REJECTED_SCHEMA = T.StructType([T.StructField(c, T.StringType()) for c in RAW_COLUMNS + (REASON,)])

RECOMMENDATIONS_COLUMNS = (USER_ID, "rank", ITEM_ID, "score")
SIMILAR_ITEMS_COLUMNS = (ITEM_ID, "rank", "similar_item_id", "similarity")
