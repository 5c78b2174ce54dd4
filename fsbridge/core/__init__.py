"""The pure core: no sockets, files or clock reads of its own; events in, PlanFix commands out.

* ``wire``: Event Socket framing and the plain event's header block;
* ``events``: an ESL event reduced to a typed channel event;
* ``tracker``: the call state machine, channel events in, PlanFix commands out;
* ``cdr``: a mod_json_cdr CDR to the facts and events of a call;
* ``originate``: a validated makeCall to an originate line, click-to-call policy;
* ``phone``: number normalisation;
* ``limiter``: the adaptive in-flight limit to PlanFix;
* ``tenancy``: which tenant (PlanFix account) a call, token or lookup belongs to.

Everything that does I/O (ESL, PlanFix HTTP, SQLite, the HTTP servers) is
in the modules beside this package and calls into it, never the reverse.
"""
