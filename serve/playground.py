"""The playground page (`/ui`, `/` redirects there) and the API's `/docs`, both from files on this machine.

The page is plain HTML/JS/CSS shipped in `serve/static/playground` (no build step, no CDN): it talks only to
this server's endpoints. `/docs` is FastAPI's Swagger UI page pointed at the Swagger UI files of the
`swagger-ui-py` package (Apache-2.0, its LICENSE next to them) instead of a CDN, so it renders offline.
Only the files named here are served: no path from the request reaches the file system.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, RedirectResponse, Response

from .errors import APIError

router = APIRouter(include_in_schema=False)
PAGE_DIR = Path(__file__).parent / "static" / "playground"
PAGE_FILES = {"playground.js": "text/javascript", "playground.css": "text/css"}
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
                 "favicon-32x32.png": "image/png", "LICENSE": "text/plain"}


def swagger_dir() -> Path | None:
    """The `swagger-ui-py` package's Swagger UI files (found without importing the package), or None."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


@router.get("/")
async def root() -> Response:
    return RedirectResponse("/ui/")


@router.get("/ui")
async def ui_redirect() -> Response:
    return RedirectResponse("/ui/")


@router.get("/ui/")
async def page() -> Response:
    return FileResponse(PAGE_DIR / "index.html", media_type="text/html")


@router.get("/ui/static/{name}")
async def page_file(name: str) -> Response:
    if name not in PAGE_FILES:
        raise APIError(404, f"no playground file {name!r}", code="not_found")
    return FileResponse(PAGE_DIR / name, media_type=PAGE_FILES[name])


@router.get("/docs")
async def docs() -> Response:
    if swagger_dir() is None:
        raise APIError(404, "the /docs page needs the swagger-ui-py package: pip install 'osprey-regions[serve]' "
                            "(/openapi.json is there without it)", code="not_found")
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Osprey region server - API",
                               swagger_js_url="/docs/static/swagger-ui-bundle.js",
                               swagger_css_url="/docs/static/swagger-ui.css",
                               swagger_favicon_url="/docs/static/favicon-32x32.png",
                               swagger_ui_parameters={"validatorUrl": None})  # no call to swagger.io's validator


@router.get("/docs/static/{name}")
async def docs_file(name: str) -> Response:
    folder = swagger_dir()
    if folder is None or name not in SWAGGER_FILES:
        raise APIError(404, f"no docs file {name!r}", code="not_found")
    return FileResponse(folder / name, media_type=SWAGGER_FILES[name])

