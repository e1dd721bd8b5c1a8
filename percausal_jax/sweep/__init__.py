"""``percausal sweep``'s parts: method specs and the selection criterion (:mod:`.spec`), cells, selection on
validation and the per-method summary (:mod:`.results`), and sweep.md / sweep.html (:mod:`.report`)."""
