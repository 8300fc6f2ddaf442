"""An HTML template for `dvc plots show` that renders without the internet.

DVC's own page loads vega from a CDN; this one inlines it (`vl-convert-python`). `make setup`
writes it (`python -m mnist_pipeline.plots_page OUT.html`) as DVC's `plots.html_template`."""

import sys
from pathlib import Path

import vl_convert

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>mnist-pipeline: DVC plots</title>
    <!-- vega LIBS_VERSION, bundled by vl-convert-python: no network needed -->
    <script type="text/javascript">
LIBS
    </script>
    <style>
        /* one row per variant: its loss, its accuracy, its confusion matrix (dvc.yaml) */
        body { font-family: sans-serif; display: grid; gap: 12px;
               grid-template-columns: repeat(2, max-content); }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template() -> str:
    """The page, with the libraries inline (a `</script` inside them would end the tag)."""
    vega_lite = max(  # DVC's chart specs declare Vega-Lite v5: the newest v5 the package ships
        (v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")),
        key=lambda v: tuple(int(part) for part in v.split(".")),
    )
    libs = vl_convert.javascript_bundle(vl_version=vega_lite).replace("</script", "<\\/script")
    versions = (
        f"{vl_convert.get_vega_version()}, vega-lite {vega_lite}, "
        f"vega-embed {vl_convert.get_vega_embed_version()}"
    )
    return PAGE.replace("LIBS_VERSION", versions).replace("LIBS", libs)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mnist_pipeline.plots_page OUTPUT.html", file=sys.stderr)
        return 2
    target = Path(args[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(template(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
