"""``percausal sweep``'s library: method specs and the selection criterion (:mod:`.spec`), the run itself
(:mod:`.runner`: cells trained and evaluated, cached, each method's LR chosen on validation), cells, selection and the
per-method summary (:mod:`.results`), sweep.md / sweep.html (:mod:`.report`), and training and evaluation driven
in-process, which stops the command when preempted (:mod:`.training`, also used by ``percausal demo``)."""
