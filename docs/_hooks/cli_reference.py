"""mkdocs hook: docs/cli.md's marker replaced by the reference generated from the commands."""


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "cli.md":
        from equiaudit.cli.reference import cli_reference

        return markdown.replace("<!-- cli-reference -->", cli_reference())
    return markdown
