module {{module}}

go 1.24
