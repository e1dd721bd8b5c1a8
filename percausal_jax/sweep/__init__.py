"""``percausal sweep``'s parts: method specs and the selection criterion (:mod:`.spec`), cells, selection on
validation and the per-method summary (:mod:`.results`), sweep.md / sweep.html (:mod:`.report`), and training driven
in-process, which stops the command when preempted (:mod:`.training`, also used by ``percausal demo``)."""
