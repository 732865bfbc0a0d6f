"""Pieces of the HTML reports (``attnpatch compare``'s and ``attnpatch analyze``'s index.html) that both write."""
from __future__ import annotations

import html

# marks the page once its images have loaded: the headless-Chromium tests read data-images-loaded="ok/total"
IMAGES_LOADED = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
</script>"""


def figures(images: dict) -> str:
    """``{caption: image path}`` as captioned <figure> elements."""
    return "".join(f"<figure><img src='{html.escape(v)}' alt='{html.escape(k)}'><figcaption>{html.escape(k)}</figcaption>"
                   "</figure>" for k, v in images.items())
