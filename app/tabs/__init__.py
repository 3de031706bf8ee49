"""One module per tab of the app. A tab is a class with `build(page)` (its components, inside
`gr.Tabs`) and `wire(page)` (its events); a tab that shows the session also has
`outputs(page)` and `views(state, form, owner, ...)` for the page's refresh. Tabs import
`app.context` and the helpers, never each other or `app.ui`."""
