"""See every result: widgets for Jupyter and offline pages, and matplotlib figures.

This room sits above every other but the CLI: it imports the results it draws,
and registers a widget and a figure for each result type
(:func:`rome_lens.core.results.register_view`), so that ``result.widget()``
and ``result.plot()`` work without the results importing this room.

* :mod:`~rome_lens.viz.html`: the :class:`Widget` class, pages and reports;
* :mod:`~rome_lens.viz.svg`: heatmaps with colour bars and line charts with axes;
* :mod:`~rome_lens.viz.widgets`: a widget for each result;
* :mod:`~rome_lens.viz.microscope`: the widgets and figures of LLM-Microscope's metrics;
* :mod:`~rome_lens.viz.influence`: the widgets and figures of influence functions;
* :mod:`~rome_lens.viz.plots`: matplotlib figures in the style of the papers.

>>> import tempfile, warnings
>>> from rome_lens.core.models import tiny_model
>>> from rome_lens.analysis import logit_lens
>>> from rome_lens.viz import report
>>> lens = logit_lens(tiny_model(), "The Eiffel Tower is in", progress=False)
>>> path = report(tempfile.mkdtemp() + "/lens.html", lens)
>>> path.suffix, "Logit lens" in path.read_text()
('.html', True)
"""

from rome_lens.viz.html import Widget, page, report
from rome_lens.viz.influence import factors_widget, influence_widget, plot_factors, plot_influence
from rome_lens.viz.microscope import (  # noqa: I001
    contextualisation_widget as contextualisation_widget,  # its name before 0.3
)
from rome_lens.viz.microscope import (
    contextualization_widget,
    geometry_widget,
    linearity_widget,
    token_layer_widget,
)
from rome_lens.viz.plots import (
    plot_average_effects,
    plot_edit,
    plot_evaluation,
    plot_logit_lens,
    plot_sequential,
    plot_severed,
    plot_spectrum,
    plot_trace,
    save_figure,
)
from rome_lens.viz.widgets import (
    edit_widget,
    evaluation_widget,
    figure_widget,
    logit_lens_widget,
    trace_widget,
)

__all__ = [
    "Widget",
    "contextualization_widget",
    "geometry_widget",
    "linearity_widget",
    "token_layer_widget",
    "edit_widget",
    "factors_widget",
    "influence_widget",
    "plot_factors",
    "plot_influence",
    "evaluation_widget",
    "figure_widget",
    "logit_lens_widget",
    "page",
    "plot_average_effects",
    "plot_edit",
    "plot_evaluation",
    "plot_logit_lens",
    "plot_sequential",
    "plot_severed",
    "plot_spectrum",
    "plot_trace",
    "report",
    "save_figure",
    "trace_widget",
]
