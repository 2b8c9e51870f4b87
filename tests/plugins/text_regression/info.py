"""What lmtune knows about the text regression task without running it (see ``TaskInfo``)."""

from lmtune.config.tasks import TaskInfo

INFO = TaskInfo(
    name="text_regression",
    summary="score texts: one number per text (ratings, readability, similarity), trained on mean squared error",
    # An error: lmtune reads metric names with loss/error words (rmse, mae ...) as lower-is-better.
    default_metric="rmse",
    auto_class="AutoModelForSequenceClassification",
    pipeline_tag="text-classification",
    usage='from transformers import pipeline\n\nscore = pipeline("text-classification", model="{name}", '
          'function_to_apply="none")\nprint(score("an example sentence"))',
    headline_metrics=(("rmse", "RMSE"), ("mae", "MAE"), ("pearson", "Pearson r"), ("spearman", "Spearman ρ")),
    comparison_metric="rmse",
    card_metrics=("rmse", "mae", "pearson", "spearman", "loss"),
    exports=("merged",),
)
