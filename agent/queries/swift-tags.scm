; Swift definitions: classes and actors, structs, enums, protocols (interfaces), typealiases and associated
; types, and funcs: methods inside a type or extension (with init), functions at the top level or nested.
(class_declaration declaration_kind: "class" name: (type_identifier) @name) @definition.class
(class_declaration declaration_kind: "actor" name: (type_identifier) @name) @definition.class
(class_declaration declaration_kind: "struct" name: (type_identifier) @name) @definition.struct
(class_declaration declaration_kind: "enum" name: (type_identifier) @name) @definition.enum
(protocol_declaration name: (type_identifier) @name) @definition.interface
(typealias_declaration name: (type_identifier) @name) @definition.type
(associatedtype_declaration name: (type_identifier) @name) @definition.type

; funcs in a class, struct, actor, enum or extension body, and protocol requirements: methods
(class_body
  (function_declaration
    name: [(simple_identifier) (custom_operator)
           "==" "!=" "===" "!==" "<" ">" "<=" ">=" "+" "-" "*" "/" "%" "&" "|" "^" "~" "!"
           "<<" ">>" "&&" "||" "+=" "-=" "*=" "/=" "%=" "..<" "..." "++" "--" "??"] @name) @definition.method)
(enum_class_body
  (function_declaration
    name: [(simple_identifier) (custom_operator)
           "==" "!=" "===" "!==" "<" ">" "<=" ">=" "+" "-" "*" "/" "%" "&" "|" "^" "~" "!"
           "<<" ">>" "&&" "||" "+=" "-=" "*=" "/=" "%=" "..<" "..." "++" "--" "??"] @name) @definition.method)
(protocol_function_declaration
  name: [(simple_identifier) (custom_operator)
         "==" "!=" "===" "!==" "<" ">" "<=" ">=" "+" "-" "*" "/" "%" "&" "|" "^" "~" "!"
         "<<" ">>" "&&" "||" "+=" "-=" "*=" "/=" "%=" "..<" "..." "++" "--" "??"] @name) @definition.method
(init_declaration name: "init" @name) @definition.method

; funcs at the top level or inside a function or closure body: functions
(source_file
  (function_declaration
    name: [(simple_identifier) (custom_operator)
           "==" "!=" "===" "!==" "<" ">" "<=" ">=" "+" "-" "*" "/" "%" "&" "|" "^" "~" "!"
           "<<" ">>" "&&" "||" "+=" "-=" "*=" "/=" "%=" "..<" "..." "++" "--" "??"] @name) @definition.function)
(statements
  (function_declaration name: (simple_identifier) @name) @definition.function)
